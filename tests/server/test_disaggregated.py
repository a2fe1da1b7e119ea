"""BAGEL's AR and DiT stages on two hosts made by the test: a network namespace joined to this
machine's by a veth pair (kv/netns.py), UCX pinned to TCP on it. Two AR servers
(`--omni-stage ar`) run there, the DiT server (`--omni-stage dit --omni-ar-url AR1,AR2`) here:

* text2img and img2img (/v1/images/edits, multipart and JSON) equal the colocated
  `vllm serve --omni` server's byte for byte, alone and sent concurrently at different
  sizes; the producers free every context on the pull's ack (their /metrics); text chat to
  the DiT server is a 400 naming the AR servers;
* a DiT server of another checkpoint is refused naming both; a context nobody pulls is
  freed when its lease ends (the metrics say "expired") and a late pull is refused;
* with AR server 1 busy the next request goes to AR server 2 (vLLM's /load); AR server 1
  killed mid-request is a 503 naming its URL, and the next request is served by AR server 2.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from vllm_omni_plugin.kv import netns
from vllm_omni_plugin.kv.nixl import nixl_available

from .conftest import BAGEL_STAGE_CONFIG, BODY_LIMIT, png_bytes, start_server, striped_image

if netns.usable() is not None or nixl_available() is not None:
    pytest.skip(netns.usable() or nixl_available(), allow_module_level=True)

REQUESTS = [  # text2img, and with a negative prompt (a second AR prefill: the cfg_text branch)
    {"prompt": "a red cube on a table", "size": "64x64", "extra_body": {"seed": 3}},
    {"prompt": "a green field", "size": "32x32", "extra_body": {"seed": 11, "negative_prompt": "blurry"}},
]


LEASE_S = 8  # the AR server's --omni-kv-lease: long for a pull on a loaded box, short for the test's wait


def _flags(workdir) -> list[str]:
    """The colocated session server's flags (tests/server/conftest.py, family bagel)."""
    stage_config = workdir / "bagel-stages.yaml"
    stage_config.write_text(BAGEL_STAGE_CONFIG)
    return ["--stage-configs-path", str(stage_config), "--max-model-len", "512", "--served-model-name", "tiny-bagel",
            "--omni-max-queue", "1", "--middleware", BODY_LIMIT]


@pytest.fixture(scope="module")
def stages(checkpoint, tmp_path_factory):
    """(AR server 1, the DiT server here asking AR servers 1 and 2, the veth hosts, AR server 2).

    Both AR servers run over there (two ports of one host); the DiT server's --omni-ar-url
    names AR 1 first, so an idle pair serves from AR 1 (least loaded, first on a tie)."""
    workdir = tmp_path_factory.mktemp("disaggregated")
    model = checkpoint("bagel")
    ar_flags = [*_flags(workdir), "--omni-stage", "ar", "--omni-kv-lease", str(LEASE_S)]
    with netns.veth_host("omni-stages") as (there, here), ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_server, "bagel", model, workdir, ar_flags, host=there, env=there.env())
                    for _ in range(2)]
        ars = [f.result() for f in starting]
        try:
            # --omni-max-queue 4: the concurrent-requests test sends 4 at once (the queue bound
            # changes no computation)
            dit = start_server("bagel", model, workdir, [*_flags(workdir), "--omni-max-queue", "4", "--omni-stage",
                                                         "dit", "--omni-ar-url", f"{ars[0].url},{ars[1].url}"],
                               env=here.env())
            try:
                yield ars[0], dit, there, ars[1]
            finally:
                dit.stop()
        finally:
            for ar in ars:
                if ar.proc.poll() is None:
                    os.killpg(ar.proc.pid, signal.SIGINT)
                    ar.stop()


def _b64(server, req: dict) -> str:
    req = dict(req)
    extra = req.pop("extra_body", {})
    answer = server.client().images.generate(model="tiny-bagel", response_format="b64_json", extra_body=extra, **req)
    return answer.data[0].b64_json


PNG = png_bytes(striped_image(48, 32))


def _edit_upload(server) -> str:
    """img2img through /v1/images/edits, multipart (the output size follows the 48x32 input)."""
    answer = server.client().images.edit(model="tiny-bagel", image=("in.png", PNG, "image/png"), prompt="make it blue",
                                         response_format="b64_json", extra_body={"seed": 4})
    return answer.data[0].b64_json


def _edit_json(server) -> str:
    """img2img through /v1/images/edits, a JSON body with a data URL, another size and a negative prompt."""
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    r = requests.post(server.url + "/v1/images/edits", headers=server.headers(), timeout=300,
                      json={"model": "tiny-bagel", "prompt": "make it green", "size": "32x32", "seed": 5,
                            "negative_prompt": "blurry", "images": [{"image_url": data_url}]})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["b64_json"]


#: every request of the byte-for-byte tests, as calls on a server
CALLS = [*(lambda server, r=r: _b64(server, r) for r in REQUESTS), _edit_upload, _edit_json]


@pytest.fixture(scope="module")
def colocated(omni_server) -> list[str]:
    """CALLS answered by the colocated `vllm serve --omni` (the session's BAGEL server), one at a time."""
    server = omni_server("bagel")
    return [call(server) for call in CALLS]


def _published(ar) -> float:
    text = requests.get(ar.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("omni_kv_published_total"))


def _freed(ar) -> dict[str, float]:
    text = requests.get(ar.url + "/metrics", timeout=10).text
    return {reason: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            for reason in ("acked", "expired") if line.startswith(f'omni_kv_freed_total{{reason="{reason}"}}')}


def test_images_equal_colocated_byte_for_byte_and_each_context_is_acked(stages, colocated):
    ar, dit, there, ar2 = stages
    sent = there.tx_bytes()
    # text2img (cond; cond + cfg_text) and img2img: the edit image reaches the AR server's engine
    # (POST /v1/omni/prefill), its three contexts (cond, cfg_text, cfg_img) come back over NIXL
    assert [call(dit) for call in CALLS] == colocated
    assert there.tx_bytes() > sent  # the KV came over the veth
    # 1 + 2 + 3 + 3 AR prefills, on either AR server: each context freed by its pull's ack, none by its lease
    deadline = time.monotonic() + 10
    while sum(_freed(a)["acked"] for a in (ar, ar2)) != 9 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [sum(_freed(a)[why] for a in (ar, ar2)) for why in ("acked", "expired")] == [9, 0]
    # text: vLLM's own route on the AR server; the DiT server refuses it naming that server
    chat = {"model": "tiny-bagel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert requests.post(ar.url + "/v1/chat/completions", json=chat, headers=ar.headers(), timeout=120).status_code == 200
    refused = requests.post(dit.url + "/v1/chat/completions", json=chat, headers=dit.headers(), timeout=30)
    assert refused.status_code == 400 and ar.url in refused.json()["error"]["message"], refused.text


def test_concurrent_requests_of_different_sizes_each_get_their_own_kv(stages, colocated):
    """64x64 and 32x32 text2img, 48x32 and 32x32 img2img at once (9 contexts in flight over two AR
    servers): each image equals its colocated one, answered alone."""
    _, dit, _, _ = stages
    with ThreadPoolExecutor(len(CALLS)) as pool:
        assert list(pool.map(lambda call: call(dit), CALLS)) == colocated


def test_a_dit_server_of_another_checkpoint_is_refused_naming_both(stages, checkpoint, tmp_path_factory):
    ar, _, _, _ = stages
    other = checkpoint("bagel", seed=1)  # the same tiny architecture, other weights
    workdir = tmp_path_factory.mktemp("mismatch")
    dit = start_server("bagel", other, workdir, [*_flags(workdir), "--omni-stage", "dit", "--omni-ar-url", ar.url])
    try:
        r = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=120,
                          json={"model": "tiny-bagel", "prompt": "a cat", "size": "32x32", "seed": 1})
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "model mismatch" in message, r.text
        assert ar.url in message and str(ar.model) in message and str(other) in message, message
        assert "model mismatch" in dit.log.read_text()  # also said at start-up
    finally:
        dit.stop()


def test_a_context_nobody_pulls_expires_and_its_pull_is_refused(stages):
    """The DiT side gone after the AR server answered (a real client asks for the KV and never pulls):
    the producer frees the context when its lease ends, its /metrics say so, a late pull is refused."""
    from vllm_omni_plugin.kv.nixl import LeaseExpired, pull_transferred
    from vllm_omni_plugin.kv.store import request_params

    ar, _, _, _ = stages
    before = _freed(ar)
    answer = ar.client().completions.create(model="tiny-bagel", prompt="a lonely context", max_tokens=1,
                                            temperature=0.0, extra_body={"kv_transfer_params": request_params()})
    report = answer.model_extra["kv_transfer_params"]["omni_kv"]
    assert report["status"] == "published"
    deadline = time.monotonic() + LEASE_S + 10
    while _freed(ar)["expired"] == before["expired"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _freed(ar) == {"acked": before["acked"], "expired": before["expired"] + 1}
    with pytest.raises(LeaseExpired, match=report["nixl"]["agent"]):
        pull_transferred(report)


def test_load_aware_choice_then_an_ar_server_killed_mid_request_is_a_503_naming_it_and_skipped(stages):
    import psutil

    ar, dit, _, ar2 = stages
    engine = psutil.Process(ar.proc.pid).children(recursive=True)
    for p in engine:
        p.suspend()  # AR server 1 takes requests (its HTTP server runs) and answers none
    got: dict = {}
    image = {"model": "tiny-bagel", "prompt": "a cat", "size": "64x64", "seed": 1}

    def ask():
        got["r"] = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=120, json=image)

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 30
    while requests.get(ar.url + "/load", timeout=5).json()["server_load"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    # load-aware: with a request held on AR server 1, the next one goes to AR server 2
    published = _published(ar2)
    second = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=120, json=image)
    assert second.status_code == 200, second.text
    assert _published(ar2) == published + 1 and asking.is_alive()
    os.killpg(ar.proc.pid, signal.SIGKILL)  # dies mid-request, its engine with it
    asking.join(60)
    assert not asking.is_alive(), "the DiT server hung on a dead AR server"
    r = got["r"]
    assert r.status_code == 503 and ar.url in r.json()["error"]["message"], r.text
    # the dead one is skipped (its /load does not answer), the other still serves
    again = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=60, json=image)
    assert again.status_code == 200, again.text
    assert again.json()["data"][0]["b64_json"] == second.json()["data"][0]["b64_json"]
    assert _published(ar2) == published + 2
    assert requests.get(dit.url + "/health", timeout=10).status_code == 200  # the DiT server stays up
