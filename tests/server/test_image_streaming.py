"""Streaming partial images (`stream: true`, `partial_images`) on /v1/images/generations and
/v1/images/edits, through the real openai client: OpenAI's event types and fields, the completed
image byte for byte the non-streamed one, partial images valid PNGs of the output size decoded
from x0 estimates, a disconnect aborting the engine work, bad input named by field.

(The edit server first, then Qwen-Image: test_images.py goes on with the same server. FLUX's stream
is tested in test_flux.py, the refusal of a family that cannot stream in test_videos.py: each with
the server those files start anyway.)"""

from __future__ import annotations

import base64
import json
import time

import requests

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import (assert_aborted_and_idle, assert_openai_error, b64_png, check_image_stream, offline_partials,
                       pil_md5, png_bytes, striped_image)
from .offline import offline

GEN = "/v1/images/generations"


def test_edit_streams_multipart_and_json(omni_server):
    server = omni_server("qwen-image-edit")
    client = server.client()
    png = png_bytes(striped_image(48, 40))
    common = dict(image=("in.png", png, "image/png"), prompt="make it blue", size="64x64")
    extra = {"seed": 3, "num_inference_steps": 3}
    events = list(client.images.edit(**common, stream=True, partial_images=2, extra_body=extra))
    partial, completed = check_image_stream(events, "image_edit", n=1, k=2, size="64x64")
    plain = client.images.edit(**common, extra_body=extra)
    assert completed[0].b64_json == plain.data[0].b64_json  # byte-identical to the non-streamed answer
    assert b64_png(partial[-1].b64_json).tobytes() != b64_png(completed[0].b64_json).tobytes()

    # JSON body (image by data: URL), partial_images 0: the completed event only
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = requests.post(server.url + "/v1/images/edits", headers=server.headers(), timeout=300, json={
        "prompt": "make it blue", "size": "64x64", **extra, "images": [{"image_url": url}],
        "stream": True, "partial_images": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    frames = [f for f in r.text.split("\n\n") if f]
    assert len(frames) == 1 and frames[0].startswith("event: image_edit.completed\ndata: ")
    assert json.loads(frames[0].split("data: ", 1)[1])["b64_json"] == plain.data[0].b64_json


def test_generate_streams_n_images_identical_to_unstreamed(omni_server, checkpoint):
    server = omni_server("qwen-image")
    client = server.client()
    args = dict(prompt="a lighthouse", n=2, size="64x64", extra_body={"seed": 11, "num_inference_steps": 4})
    events = list(client.images.generate(**args, stream=True, partial_images=3))
    partial, completed = check_image_stream(events, "image_generation", n=2, k=3, size="64x64")
    plain = client.images.generate(**args)
    assert [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    # each completed event carries the answer's `omni` block: the unstreamed request's, but for partial_images
    for e in completed:
        resolved = e.model_extra["omni"]["resolved"]
        assert resolved == {**plain.model_extra["omni"]["resolved"], "partial_images": 3}, resolved
    # the same engine path offline (Omni in this process, LocalEngineClient): the same partial pixels
    out, md5s = offline_partials(offline(checkpoint, "qwen-image"), SamplingParams(
        prompt="a lighthouse", num_outputs_per_prompt=2, width=64, height=64, seed=11, num_inference_steps=4,
        partial_images=3))
    assert md5s == [pil_md5(b64_png(e.b64_json)) for e in partial]
    assert [pil_md5(img) for img in out.images] == [pil_md5(b64_png(e.b64_json)) for e in completed]
    for row in range(2):  # x0 after step 3 of 4 is not yet the final image
        last = [e for e in partial if e.model_extra["index"] == row][-1]
        assert b64_png(last.b64_json).tobytes() != b64_png(completed[row].b64_json).tobytes()
    assert len(set(e.b64_json for e in partial)) == len(partial)  # each a different estimate


def test_stream_bad_input_names_the_field(omni_server):
    server = omni_server("qwen-image")
    for body, param, fragment in [
        ({"stream": True, "partial_images": 4}, "partial_images", "within [0, 3]"),
        ({"stream": True, "partial_images": -1}, "partial_images", "within [0, 3]"),
        ({"stream": True, "partial_images": 1.5}, "partial_images", "integer"),
        ({"partial_images": 2}, "partial_images", "needs `stream: true`"),
        ({"stream": True, "response_format": "url"}, "response_format", "b64_json"),
        ({"stream": "yes"}, "stream", "true or false"),
    ]:
        assert_openai_error(server, GEN, {"prompt": "x", **body}, 400, param, fragment)


def test_disconnect_mid_stream_aborts_the_request(omni_server):
    """A client that reads the first partial image and closes the connection: the engine aborts
    the request at its next step, long before its 200 steps, and holds nothing for it after."""
    server = omni_server("qwen-image")
    before = server.metrics()
    body = {"prompt": "slow", "num_inference_steps": 200, "size": "128x128", "seed": 1, "stream": True,
            "partial_images": 3}
    started = time.monotonic()
    with requests.post(server.url + GEN, json=body, headers=server.headers(), stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        lines = r.iter_lines()
        assert next(lines).startswith(b"event: image_generation.partial_image")
    assert time.monotonic() - started < 120
    assert_aborted_and_idle(server, before, aborted=1, rejected=0, max_steps=200)


def test_offline_engine_process_streams_as_in_process(checkpoint):
    """Offline `Omni(engine_process=True)`: partial images cross the process boundary (raw frames)
    and are the in-process engine's, in the same order; fewer steps than asked partials: N-1."""
    from vllm_omni_plugin.omni import Omni

    params = SamplingParams(prompt="a boat", width=64, height=64, seed=2, num_inference_steps=3, partial_images=3)
    here, here_md5 = offline_partials(offline(checkpoint, "qwen-image"), params)
    with Omni(str(checkpoint("qwen-image")), engine_process=True) as omni:
        there, there_md5 = offline_partials(omni, params)
    assert len(here_md5) == 2 and there_md5 == here_md5  # after steps 1 and 2 of 3
    assert pil_md5(there.images[0]) == pil_md5(here.images[0])
