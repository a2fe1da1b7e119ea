"""GLM-Image's AR and DiT stages on two hosts made by the test: a network namespace joined to this
machine's by a veth pair (kv/netns.py). The AR server (`--omni-stage ar`: vLLM's own server) runs
there, the DiT server (`--omni-stage dit --omni-ar-url`) here; the AR's prior tokens come back in
vLLM's /inference/v1/generate answer (orchestrator/remote.py). Through the real openai client,
text-to-image (a non-square size: its own token grid) and image-to-image (the source image goes
to the AR server) equal the colocated `vllm serve --omni` server's images byte for byte; a DiT
server of another checkpoint is refused naming both; an AR server killed mid-request is a 503
naming its URL and the DiT server keeps serving.

This file and test_glm_image_server.py use the session's colocated GLM-Image server (the
deterministic-AR checkpoint), started once: order.py runs the files of one server one after the other."""

from __future__ import annotations

import pytest
import requests

from vllm_omni_plugin.kv import netns

from .conftest import GLM_IMAGE_STAGE_CONFIG, png_bytes, start_server
from .two_hosts import ar_and_dit, killed_mid_request

if netns.usable() is not None:
    pytest.skip(netns.usable(), allow_module_level=True)

pytestmark = pytest.mark.engine

MODEL = "tiny-glm-image"
PROMPT = 'A "GLM" sign on a red wall'


def _flags(workdir) -> list[str]:
    """The colocated session server's flags (tests/server/conftest.py, family glm-image)."""
    stage_config = workdir / "glm-image-stages.yaml"
    stage_config.write_text(GLM_IMAGE_STAGE_CONFIG)
    return ["--stage-configs-path", str(stage_config), "--served-model-name", MODEL]


@pytest.fixture(scope="module")
def stages(glm_image_checkpoint, omni_server, tmp_path_factory):
    """(the AR server over there, the DiT server here, the veth hosts, the colocated server)."""
    colocated = omni_server("glm-image")  # first: the session's previous server stops
    workdir = tmp_path_factory.mktemp("glm-disaggregated")
    with ar_and_dit("glm-image", glm_image_checkpoint, workdir, _flags(workdir), "omni-glm") as (ar, dit, there):
        yield ar, dit, there, colocated


def _images(server) -> list[str]:
    """text-to-image at two sizes (two token grids, one with a preview), image-to-image (no size: the
    source image's 320x256), each as b64 PNG."""
    from test_glm_image_vllm import source_image

    client = server.client()
    out = [client.images.generate(model=MODEL, prompt=PROMPT, size=size, response_format="b64_json",
                                  extra_body={"seed": seed, "num_inference_steps": 3}).data[0].b64_json
           for size, seed in (("448x256", 7), ("256x256", 5))]
    edit = client.images.edit(model=MODEL, image=("in.png", png_bytes(source_image()), "image/png"), prompt=PROMPT,
                              extra_body={"seed": 4, "num_inference_steps": 3})
    return [*out, edit.data[0].b64_json]


def test_t2i_and_i2i_equal_colocated_byte_for_byte(stages):
    ar, dit, there, colocated = stages
    sent = there.tx_bytes()
    disaggregated = _images(dit)
    assert there.tx_bytes() > sent  # the prior tokens came over the veth
    assert _images(colocated) == disaggregated
    # text: GLM-Image answers with images only, on either server; the AR server's vLLM routes are plain vLLM's
    models = requests.get(ar.url + "/v1/models", headers=ar.headers(), timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_a_dit_server_of_another_checkpoint_is_refused_naming_both(stages, checkpoint, tmp_path_factory):
    ar, _, _, _ = stages
    other = checkpoint("glm-image")  # the sampling AR's generation_config: another checkpoint
    workdir = tmp_path_factory.mktemp("glm-mismatch")
    dit = start_server("glm-image", other, workdir, [*_flags(workdir), "--omni-stage", "dit", "--omni-ar-url", ar.url])
    try:
        r = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=60,
                          json={"model": MODEL, "prompt": PROMPT, "size": "256x256", "seed": 1})
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "model mismatch" in message, r.text
        assert ar.url in message and str(ar.model) in message and str(other) in message, message
    finally:
        dit.stop()


def test_an_ar_server_killed_mid_request_is_a_503_naming_it(stages):
    ar, dit, _, _ = stages
    body = {"model": MODEL, "prompt": PROMPT, "size": "256x256", "seed": 1, "num_inference_steps": 3}
    r = killed_mid_request(ar, dit, body)
    assert r.status_code == 503 and ar.url in r.json()["error"]["message"], r.text
    # the DiT server keeps serving: healthy, a clear 503 for the next image, its own 400s
    assert requests.get(dit.url + "/health", timeout=10).status_code == 200
    again = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=60, json=body)
    assert again.status_code == 503 and ar.url in again.json()["error"]["message"], again.text
    bad = requests.post(dit.url + "/v1/images/generations", headers=dit.headers(), timeout=60,
                        json={**body, "size": "250x256"})
    assert bad.status_code == 400 and "multiples of 32" in bad.json()["error"]["message"], bad.text
