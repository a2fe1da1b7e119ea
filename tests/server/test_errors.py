"""Every documented error: status, OpenAI-format body, message; the server keeps
serving; a full queue answers 503; a client that disconnects frees its engine work."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from .conftest import assert_aborted_and_idle, assert_framework_errors_shaped, assert_openai_error

pytestmark = pytest.mark.engine

GEN = "/v1/images/generations"
CHAT = "/v1/chat/completions"
MODEL = "tiny-qwen-image"

CASES = [
    # (path, json body, status, param, message fragment)
    (GEN, {"prompt": "x", "size": "big"}, 400, "size", "WIDTHxHEIGHT"),
    (GEN, {"prompt": "x", "size": "0x64"}, 400, "size", "positive width and height"),
    (GEN, {"prompt": "x", "size": "4096x4096"}, 400, "size", "--omni-max-pixels"),
    (GEN, {"prompt": "x", "n": 0}, 400, "n", "positive integer"),
    (GEN, {"prompt": "x", "n": -3}, 400, "n", "positive integer"),
    (GEN, {"prompt": "x", "n": 9}, 400, "n", "--omni-max-n"),
    (GEN, {"prompt": "x", "n": "two"}, 400, "n", "must be an integer"),
    (GEN, {"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "positive integer"),
    (GEN, {"prompt": "x", "num_inference_steps": 201}, 400, "num_inference_steps", "--omni-max-steps"),
    (GEN, {"prompt": "x", "seed": -1}, 400, "seed", "seed"),
    (GEN, {"prompt": "x", "true_cfg_scale": "high"}, 400, "true_cfg_scale", "must be a number"),
    # fields Qwen-Image does not read (its declaration): refused by name, never dropped
    (GEN, {"prompt": "x", "guidance_scale": 3.5}, 400, "guidance_scale", "not used by this model"),
    (GEN, {"prompt": "x", "layers": 2}, 400, "layers", "not used by this model"),
    (GEN, {"prompt": "x", "cfg_text_scale": 2.0}, 400, "cfg_text_scale", "unknown parameter"),  # BAGEL's knob
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "num_frames": 5}, 400, "num_frames",
     "not used by this model"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools",
     "unknown parameter"),
    (GEN, {"prompt": "x", "output_format": "gif"}, 400, "output_format", "png, jpeg, webp"),
    (GEN, {"prompt": "x", "response_format": "url"}, 400, "response_format", "use b64_json"),
    (GEN, {"prompt": "x", "background": "transparent"}, 400, "background", "layered model"),
    (GEN, {"prompt": "x", "num_inference_step": 3}, 400, "num_inference_step", "unknown parameter"),
    # a chat image answer streams (test_image_streaming.py); partial images only in a stream
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "partial_images": 1},
     400, "partial_images", "needs `stream: true`"),
    (GEN, {"size": "64x64"}, 400, "prompt", "`prompt` is required"),
    (GEN, {"prompt": "x", "model": "no-such-model"}, 404, "model", "does not exist"),
    (GEN, [1, 2], 400, None, "JSON object"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "non-empty"),
    (CHAT, {"model": MODEL, "messages": [{"role": "system", "content": "hi"}]}, 400, "messages", "no user message"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "size": "1x"}, 400, "size", "WIDTHxHEIGHT"),
    (CHAT, {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
    # image inputs by URL follow vLLM's media rules: no local file without --allowed-local-media-path
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400, "messages.content.image_url", "--allowed-local-media-path"),
    ("/v1/videos", {"prompt": "a boat"}, 400, "model", "not videos"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_error_cases(omni_server, path, body, status, param, fragment):
    assert_openai_error(omni_server("qwen-image"), path, body, status, param, fragment)


def test_undecodable_json_and_edit_on_text_model(omni_server):
    server = omni_server("qwen-image")
    r = requests.post(server.url + GEN, data=b"{not json", headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    files = {"image": ("a.png", b"\x89PNG not really", "image/png")}
    r = requests.post(server.url + "/v1/images/edits", data={"prompt": "x"}, files=files, headers=server.headers())
    assert r.status_code == 400 and "could not be decoded" in r.json()["error"]["message"]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    files = {"image": ("a.png", buf.getvalue(), "image/png")}
    r = requests.post(server.url + "/v1/images/edits", data={"prompt": "x"}, files=files, headers=server.headers())
    assert r.status_code == 400 and "does not take input images" in r.json()["error"]["message"]
    for video_id in ("video_" + "0" * 32, "nope"):
        r = requests.get(f"{server.url}/v1/videos/{video_id}", headers=server.headers())
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def test_error_bodies_of_every_layer(omni_server):
    """The diffusion-only app (vLLM's middleware and handlers) answers like vLLM's own server."""
    assert_framework_errors_shaped(omni_server("qwen-image"), completions_422=False)
    r = requests.post(omni_server("qwen-image").url + CHAT, headers=omni_server("qwen-image").headers(), timeout=30,
                      json={"messages": [{"role": "user", "content": "x"}], "modalities": ["text"]})
    assert r.status_code == 400 and "answers with images, not text" in r.json()["error"]["message"]


def test_server_keeps_serving_after_errors(omni_server):
    server = omni_server("qwen-image")
    r = server.client().images.generate(prompt="still here", extra_body={"seed": 2})
    assert r.data[0].b64_json
    m = server.metrics()
    assert m["omni_engine_requests_failed"] == 0  # bad input never reached the engine
    assert m["omni_engine_requests_in_flight"] == 0


def test_queue_full_then_disconnect_frees_engine(omni_server):
    """--omni-max-queue 2: two slow requests fill it, a third gets 503. The two
    clients then hang up; the engine aborts both at a step boundary long before
    their 200 steps would end, and holds no state for them afterwards."""
    server = omni_server("qwen-image")
    before = server.metrics()
    slow = {"prompt": "slow", "num_inference_steps": 200, "size": "512x512", "seed": 1}
    outcomes: list[str] = []

    def hang_up_after(seconds: float) -> None:
        try:
            r = requests.post(server.url + GEN, json=slow, headers=server.headers(), timeout=seconds)
            outcomes.append(f"answered {r.status_code}")
        except requests.exceptions.ReadTimeout:
            outcomes.append("disconnected")

    threads = [threading.Thread(target=hang_up_after, args=(2.0,)) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    while server.metrics()["omni_engine_requests_in_flight"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = requests.post(server.url + GEN, json={"prompt": "third"}, headers=server.headers(), timeout=30)
    assert r.status_code == 503, r.text
    assert "--omni-max-queue 2" in r.json()["error"]["message"]
    for t in threads:
        t.join()
    assert outcomes == ["disconnected", "disconnected"]

    assert_aborted_and_idle(server, before, aborted=2, rejected=1, max_steps=200)
    # and it serves again
    assert server.client().images.generate(prompt="after", extra_body={"seed": 3}).data
