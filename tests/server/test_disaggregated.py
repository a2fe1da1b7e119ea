"""BAGEL's AR and DiT stages on two hosts made by the test: a network namespace joined to this
machine's by a veth pair (kv/netns.py), UCX pinned to TCP on it. The AR server
(`--omni-stage ar`) runs there, the DiT server (`--omni-stage dit --omni-ar-url`) here;
their images equal the colocated `vllm serve --omni` server's byte for byte, the producer
frees every context on the pull's ack (its /metrics), text chat to the DiT server is a 400
naming the AR server, and an AR server killed mid-request is a 503 naming its URL."""

from __future__ import annotations

import time

import pytest
import requests

from vllm_omni_plugin.kv import netns
from vllm_omni_plugin.kv.nixl import nixl_available

from .conftest import BAGEL_STAGE_CONFIG, BODY_LIMIT
from .two_hosts import ar_and_dit, killed_mid_request

if netns.usable() is not None or nixl_available() is not None:
    pytest.skip(netns.usable() or nixl_available(), allow_module_level=True)

REQUESTS = [  # text2img, and with a negative prompt (a second AR prefill: the cfg_text branch)
    {"prompt": "a red cube on a table", "size": "64x64", "extra_body": {"seed": 3}},
    {"prompt": "a green field", "size": "32x32", "extra_body": {"seed": 11, "negative_prompt": "blurry"}},
]


def _flags(workdir) -> list[str]:
    """The colocated session server's flags (tests/server/conftest.py, family bagel)."""
    stage_config = workdir / "bagel-stages.yaml"
    stage_config.write_text(BAGEL_STAGE_CONFIG)
    return ["--stage-configs-path", str(stage_config), "--max-model-len", "512", "--served-model-name", "tiny-bagel",
            "--omni-max-queue", "1", "--middleware", BODY_LIMIT]


@pytest.fixture(scope="module")
def stages(checkpoint, tmp_path_factory):
    """(the AR server over there, the DiT server here, the veth hosts)."""
    workdir = tmp_path_factory.mktemp("disaggregated")
    model = checkpoint("bagel")
    with ar_and_dit("bagel", model, workdir, _flags(workdir), "omni-stages") as stages:
        yield stages


def _b64(server, req: dict) -> str:
    req = dict(req)
    extra = req.pop("extra_body", {})
    answer = server.client().images.generate(model="tiny-bagel", response_format="b64_json", extra_body=extra, **req)
    return answer.data[0].b64_json


def _freed(ar) -> dict[str, float]:
    text = requests.get(ar.url + "/metrics", timeout=10).text
    return {reason: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            for reason in ("acked", "expired") if line.startswith(f'omni_kv_freed_total{{reason="{reason}"}}')}


def test_images_equal_colocated_byte_for_byte_and_each_context_is_acked(stages, omni_server):
    ar, dit, there = stages
    sent = there.tx_bytes()
    disaggregated = [_b64(dit, r) for r in REQUESTS]
    assert there.tx_bytes() > sent  # the KV came over the veth
    colocated = omni_server("bagel")
    assert [_b64(colocated, r) for r in REQUESTS] == disaggregated
    # 3 AR prefills (cond; cond + cfg_text): each context freed by its pull's ack, none by its lease
    deadline = time.monotonic() + 10
    while _freed(ar).get("acked") != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _freed(ar) == {"acked": 3.0, "expired": 0.0}
    # text: vLLM's own route on the AR server; the DiT server refuses it naming that server
    chat = {"model": "tiny-bagel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert requests.post(ar.url + "/v1/chat/completions", json=chat, headers=ar.headers(), timeout=120).status_code == 200
    refused = requests.post(dit.url + "/v1/chat/completions", json=chat, headers=dit.headers(), timeout=30)
    assert refused.status_code == 400 and ar.url in refused.json()["error"]["message"], refused.text


def test_an_ar_server_killed_mid_request_is_a_503_naming_it(stages):
    ar, dit, _ = stages
    r = killed_mid_request(ar, dit, {"model": "tiny-bagel", "prompt": "a cat", "size": "64x64", "seed": 1})
    assert r.status_code == 503 and ar.url in r.json()["error"]["message"], r.text
    again = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=60,
                          json={"model": "tiny-bagel", "prompt": "a cat", "size": "64x64", "seed": 1})
    assert again.status_code == 503 and ar.url in again.json()["error"]["message"], again.text
    assert requests.get(dit.url + "/health", timeout=10).status_code == 200  # the DiT server stays up
