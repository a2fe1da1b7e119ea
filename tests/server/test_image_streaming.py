"""Streaming partial images (`stream: true`, `partial_images`) on /v1/images/generations and
/v1/images/edits, through the real openai client: OpenAI's event types and fields, the completed
image byte for byte the non-streamed one, partial images valid PNGs of the output size decoded
from x0 estimates, a disconnect aborting the engine work, bad input named by field. Then chat's
stream of an image answer (vLLM's `chat.completion.chunk` framing, the unstreamed images byte for byte).

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


CHAT = "/v1/chat/completions"


def _chat_stream(client, **kw) -> list:
    return list(client.chat.completions.create(model="tiny-qwen-image", stream=True, **kw))


def test_chat_streams_vllm_chunks_with_the_unstreamed_images(omni_server):
    """`modalities: ["image"]` + `stream: true` on chat, through the openai client: vLLM's chunk
    order (role, content, finish), the images in one content chunk as the unstreamed answer's
    `image_url` parts, byte for byte; the raw framing is vLLM's (`data:` lines, `[DONE]`)."""
    server = omni_server("qwen-image")
    client = server.client()
    messages = [{"role": "user", "content": "a red cat"}]
    ext = {"modalities": ["image"], "seed": 5, "num_inference_steps": 2, "n": 2, "size": "64x48"}
    chunks = _chat_stream(client, messages=messages, extra_body=ext)
    plain = client.chat.completions.create(model="tiny-qwen-image", messages=messages, extra_body=ext)

    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 3 and len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and {c.model for c in chunks} == {"tiny-qwen-image"}
    role, content, finish = (c.choices[0] for c in chunks)
    assert (role.delta.role, role.delta.content, role.finish_reason) == ("assistant", "", None)
    # the openai client keeps a non-string `delta.content` as it came (its type says str): a list of parts
    assert content.finish_reason is None and content.delta.content == plain.choices[0].message.content
    parts = content.delta.content
    assert len(parts) == 2 and len({p["image_url"]["url"] for p in parts}) == 2
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts)
    assert finish.finish_reason == "stop" and finish.delta.content is None
    omni = chunks[-1].model_extra["omni"]
    assert omni["resolved"] == plain.model_extra["omni"]["resolved"] and omni["resolved"]["seed"] == 5

    # the wire, as vLLM's streaming chat frames it; usage on request
    body = {"model": "tiny-qwen-image", "messages": messages, "stream": True, **ext,
            "stream_options": {"include_usage": True}}
    with requests.post(server.url + CHAT, json=body, headers=server.headers(), stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.content.decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    data = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert data[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]
    assert data[1]["choices"][0]["delta"]["content"] == parts  # same seed: the same bytes again
    assert data[2]["choices"][0]["finish_reason"] == "stop"
    assert data[3]["choices"] == [] and data[3]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0,
                                                           "total_tokens": 0}

    # partial images (an extension): a chunk per round between the role and the images, which do not change
    chunks = _chat_stream(client, messages=messages, extra_body={**ext, "num_inference_steps": 3, "partial_images": 2})
    plain = client.chat.completions.create(model="tiny-qwen-image", messages=messages,
                                           extra_body={**ext, "num_inference_steps": 3})
    rounds = [c.model_extra["omni_partial_image"] for c in chunks[1:3]]
    assert [r["partial_image_index"] for r in rounds] == [0, 1] and len(chunks) == 5
    assert all(c.choices[0].delta.content is None and c.choices[0].finish_reason is None for c in chunks[1:3])
    for r in rounds:
        assert len(r["content"]) == 2 and all(p["type"] == "image_url" for p in r["content"])
        sizes = {b64_png(p["image_url"]["url"].split(",", 1)[1]).size for p in r["content"]}
        assert sizes == {(64, 48)}
    assert chunks[3].choices[0].delta.content == plain.choices[0].message.content  # the unstreamed bytes
    assert rounds[1]["content"] != plain.choices[0].message.content  # x0 after step 2 of 3: not yet final


def test_chat_stream_bad_input_and_disconnect(omni_server):
    """Refusals before the stream are JSON 400s naming the field; a client that reads the role
    chunk and hangs up aborts the engine work at its next step."""
    server = omni_server("qwen-image")
    user = {"model": "tiny-qwen-image", "messages": [{"role": "user", "content": "x"}], "modalities": ["image"]}
    for body, param, fragment in [
        ({"stream": True, "partial_images": 4}, "partial_images", "within [0, 3]"),
        ({"partial_images": 1}, "partial_images", "needs `stream: true`"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "`stream: true`"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "true or false"),
        ({"stream": True, "size": "1x"}, "size", "WIDTHxHEIGHT"),
        ({"stream": "yes"}, "stream", "true or false"),
    ]:
        assert_openai_error(server, CHAT, {**user, **body}, 400, param, fragment)

    before = server.metrics()
    body = {**user, "stream": True, "num_inference_steps": 200, "size": "128x128", "seed": 1}
    started = time.monotonic()
    with requests.post(server.url + CHAT, json=body, headers=server.headers(), stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        first = json.loads(next(r.iter_lines())[len(b"data: "):])
        assert first["choices"][0]["delta"]["role"] == "assistant"
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
