"""`vllm serve <tiny BAGEL> --omni`: vLLM's own OpenAI server with the omni routes; all four
modalities over HTTP equal the offline `Omni`.

One real server process (vLLM's API server: the AR stage on vLLM's CPU engine,
started with --stage-configs-path holding CPU-sized engine args and
`--max-model-len 512` on the command line; the DiT stage inline on the same
engine client) and the session's offline `Omni` (`bagel_omni`), real `openai`
client:

* vLLM's text API on the same process: streaming chat (the chunks join to the
  non-streamed text), logprobs, /v1/completions, /v1/responses;

* text2img: offline `Omni.generate` vs /v1/images/generations vs
  /v1/chat/completions (modalities=["image"]) -> byte-identical decoded pixels;
* img2img: /v1/images/edits (upload) and chat with an image_url part vs offline;
* text2text / img2text: chat text vs offline `Omni.generate_text` on the prompt
  written out by hand (greedy; the same tokens, hence the same text);
* bad requests get their 4xx (including vLLM's own checks and the AR engine's
  max_model_len, which the command-line flag set), and the server keeps serving;
* --omni-max-queue 1 refuses a second image request; a client that hangs up
  has its work aborted.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import requests
from PIL import Image

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import (assert_aborted_and_idle, assert_framework_errors_shaped, assert_openai_error, b64_png,
                       check_image_stream, decoded_md5, offline_partials, pil_md5, png_bytes, striped_image)
from .offline import comparable
from .openapi_bodies import assert_omni_bodies

pytestmark = pytest.mark.engine

MODEL = "tiny-bagel"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def _input_image() -> Image.Image:
    return striped_image(48, 32)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat_images(resp) -> list[bytes]:
    parts = resp.choices[0].message.content
    assert isinstance(parts, list) and all(p["type"] == "image_url" for p in parts)
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts]


def test_text2img_offline_images_chat_identical(omni_server, bagel_omni):
    client = omni_server("bagel").client()
    # negative prompt: the text-CFG context is a second AR prefill; cfg_text_scale: BAGEL's own knob
    ext = {"seed": 7, "num_inference_steps": 4, "negative_prompt": "blurry", "cfg_text_scale": 3.0}
    http = client.images.generate(model=MODEL, prompt="a red cat", size="48x32", extra_body=ext)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a red cat"}], modalities=["image"],
        extra_body={**ext, "size": "48x32"},
    )
    (off,) = bagel_omni.generate(["a red cat"], SamplingParams(
        seed=7, num_inference_steps=4, negative_prompt="blurry", width=48, height=32, extra={"cfg_text_scale": 3.0}))

    md5 = pil_md5(off.images[0])
    assert decoded_md5(base64.b64decode(http.data[0].b64_json)) == md5
    assert [decoded_md5(b) for b in _chat_images(chat)] == [md5]
    assert http.size == "48x32" and off.images[0].size == (48, 32)
    resolved = comparable(off.params.public_dict())
    assert resolved["extra"]["cfg_text_scale"] == 3.0
    assert http.model_extra["omni"]["resolved"] == resolved
    assert chat.model_extra["omni"]["resolved"] == resolved
    # each stage's dtype as its engine holds it: vLLM's resolved model dtype, the DiT's weights
    stages = bagel_omni._stages
    ran = {stages.ar.id: str(stages.llm.vllm_config.model_config.dtype).removeprefix("torch."),
           stages.dit.id: str(next(iter(bagel_omni.pipeline.pipe.model.w.values())).dtype).removeprefix("torch.")}
    assert off.dtypes == ran
    assert http.model_extra["omni"]["dtypes"] == chat.model_extra["omni"]["dtypes"] == ran

    # streamed (vLLM's chunk framing): no text before the image (the AR stage only prefills), then
    # the unstreamed answer's image parts byte for byte, then the finish chunk with the same `omni`
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a red cat"}], modalities=["image"], stream=True,
        extra_body={**ext, "size": "48x32"}))
    assert [c.choices[0].delta.role for c in chunks] == ["assistant", None, None]
    assert [c.choices[0].delta.content for c in chunks] == ["", chat.choices[0].message.content, None]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["omni"] == chat.model_extra["omni"] | {
        "request_id": chunks[-1].model_extra["omni"]["request_id"]}


def test_text2img_streams_partial_images(omni_server, bagel_omni):
    """BAGEL's DiT stage streams (docs/server.md, "Streaming partial images") through the multi-stage
    path: OpenAI's events, partial images after DiT steps 1 and 2 of 3 (4 flow times) of the output
    size, the completed image byte for byte the unstreamed answer; partial_images 0 is the completed
    event only; the offline Omni's on_event gets the same partial pixels."""
    client = omni_server("bagel").client()
    args = dict(model=MODEL, prompt="a red cat", size="32x32",
                extra_body={"seed": 9, "num_inference_steps": 4, "negative_prompt": "blurry"})
    events = list(client.images.generate(**args, stream=True, partial_images=2))
    partial, completed = check_image_stream(events, "image_generation", n=1, k=2, size="32x32")
    plain = client.images.generate(**args)
    assert completed[0].b64_json == plain.data[0].b64_json
    assert len({e.b64_json for e in partial + completed}) == 3  # each a different estimate
    assert completed[0].model_extra["omni"]["resolved"] == {**plain.model_extra["omni"]["resolved"],
                                                            "partial_images": 2}
    only = list(client.images.generate(**args, stream=True, partial_images=0))
    assert [e.type for e in only] == ["image_generation.completed"]
    assert only[0].b64_json == plain.data[0].b64_json
    out, md5s = offline_partials(bagel_omni, SamplingParams(
        prompt="a red cat", negative_prompt="blurry", width=32, height=32, seed=9, num_inference_steps=4,
        partial_images=2))
    assert md5s == [pil_md5(b64_png(e.b64_json)) for e in partial]
    assert pil_md5(out.images[0]) == pil_md5(b64_png(plain.data[0].b64_json))


def test_img2img_edits_and_chat_equal_offline(omni_server, bagel_omni):
    server = omni_server("bagel")
    client = server.client()
    image = _input_image()
    png = png_bytes(image)
    ext = {"seed": 4, "num_inference_steps": 4}
    upload = client.images.edit(model=MODEL, image=("in.png", png, "image/png"), prompt="make it blue", extra_body=ext)
    chat = client.chat.completions.create(
        model=MODEL, modalities=["image"], extra_body=ext,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                               {"type": "text", "text": "make it blue"}]}],
    )
    (off,) = bagel_omni.generate(["make it blue"], SamplingParams(images=[image], **ext))

    md5 = pil_md5(off.images[0])
    assert off.images[0].size == (48, 32)  # the output size follows the input image on every path
    assert decoded_md5(base64.b64decode(upload.data[0].b64_json)) == md5
    assert [decoded_md5(b) for b in _chat_images(chat)] == [md5]
    resolved = comparable(off.params.public_dict())
    assert resolved["extra"]["cfg_img_scale"] == 1.5 and resolved["num_input_images"] == 1
    assert upload.model_extra["omni"]["resolved"] == resolved
    assert chat.model_extra["omni"]["resolved"] == resolved


def test_text2text_and_img2text_equal_offline(omni_server, bagel_omni):
    from vllm import SamplingParams as VllmSamplingParams

    client = omni_server("bagel").client()
    greedy = VllmSamplingParams(temperature=0.0, max_tokens=6)

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a red cat."}], max_tokens=6, temperature=0.0)
    prompt = f"{SYSTEM}<|im_start|>user\nDescribe a red cat.<|im_end|>\n<|im_start|>assistant\n"
    (off,) = bagel_omni.generate_text([{"prompt": prompt}], greedy)
    assert chat.choices[0].message.content == off.outputs[0].text
    assert chat.usage.completion_tokens == len(off.outputs[0].token_ids) == 6
    assert chat.usage.prompt_tokens == len(off.prompt_token_ids)

    image = _input_image()
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0.0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png_bytes(image))}},
                                               {"type": "text", "text": "What is in the picture?"}]}],
    )
    prompt = (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{IMAGE_BLOCK}What is in the picture?"
              "<|im_end|>\n<|im_start|>assistant\n")
    (off,) = bagel_omni.generate_text([{"prompt": prompt, "multi_modal_data": {"image": image}}], greedy)
    assert chat.choices[0].message.content == off.outputs[0].text
    assert chat.usage.prompt_tokens == len(off.prompt_token_ids)

    # omitted sampling fields: the AR stage's default_sampling_params (the test stage config: greedy,
    # 8 tokens), which reach vLLM's handler as its generation config
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"
    (off,) = bagel_omni.generate_text([{"prompt": f"{SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"}],
                                      VllmSamplingParams(temperature=0.0, max_tokens=8))
    assert chat.choices[0].message.content == off.outputs[0].text


def test_vllm_text_api_and_images_from_one_server(omni_server, bagel_omni):
    """Streaming chat, logprobs, /v1/completions and /v1/responses are vLLM's own handlers on the
    AR engine that the image requests of the same process prefill on."""
    from vllm import SamplingParams as VllmSamplingParams

    server = omni_server("bagel")
    client = server.client()
    messages = [{"role": "user", "content": "Describe a red cat."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                           logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6

    # logprobs: one entry per generated token, each the greedy choice (the top of its top_logprobs)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0.0

    # /v1/completions: the raw prompt, as offline (no chat template)
    done = client.completions.create(model=MODEL, prompt="A red cat", max_tokens=5, temperature=0.0, logprobs=1)
    (off,) = bagel_omni.generate_text([{"prompt": "A red cat"}], VllmSamplingParams(temperature=0.0, max_tokens=5))
    assert done.choices[0].text == off.outputs[0].text and len(done.choices[0].logprobs.tokens) == 5

    # /v1/responses (vLLM's): the same text as chat for the same conversation
    resp = client.responses.create(model=MODEL, input=messages, max_output_tokens=6, temperature=0.0)
    assert resp.output_text == whole.choices[0].message.content

    # and images from the same process
    img = client.images.generate(model=MODEL, prompt="a red cat", size="32x32", extra_body={"seed": 5})
    assert Image.open(io.BytesIO(base64.b64decode(img.data[0].b64_json))).size == (32, 32)
    assert server.proc.poll() is None


GEN, CHAT, EDITS = "/v1/images/generations", "/v1/chat/completions", "/v1/images/edits"
USER = [{"role": "user", "content": "x"}]
_TINY_PNG = _data_url(png_bytes(Image.new("RGB", (32, 32), (10, 200, 30))))
CASES = [
    # (path, json body, status, param, message fragment)
    # the pipeline's own rules: InvalidParams names the field (request/protocol.py, 400 vs 500)
    (GEN, {"prompt": "x", "size": "40x40"}, 400, "size", "multiples of 16"),
    (GEN, {"prompt": "x", "cfg_interval": [0.4]}, 400, "cfg_interval", "list of 2 numbers"),
    (GEN, {"prompt": "x", "cfg_text_scale": "high"}, 400, "cfg_text_scale", "must be a number"),
    (GEN, {"prompt": "x", "cfg_renorm_type": "nope"}, 400, "cfg_renorm_type", "cfg_renorm_type"),
    (GEN, {"prompt": "x", "num_inference_steps": 201}, 400, "num_inference_steps", "--omni-max-steps"),
    # BAGEL's declaration: its CFG is cfg_text_scale / cfg_img_scale, not these; one input image at most
    (GEN, {"prompt": "x", "guidance_scale": 3.0}, 400, "guidance_scale", "not used by this model"),
    (CHAT, {"messages": USER, "modalities": ["image"], "true_cfg_scale": 4}, 400, "true_cfg_scale",
     "not used by this model"),
    (EDITS, {"prompt": "x", "images": [{"image_url": _TINY_PNG}] * 2}, 400, "image", "at most 1 input image, got 2"),
    (GEN, {"prompt": "x", "model": "other"}, 404, "model", "does not exist"),
    # the AR engine's max_model_len: 512 from the command line beat the stage config's 1024
    (GEN, {"prompt": "word " * 600, "size": "32x32"}, 400, "input_tokens", "512"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "input_tokens", "512"),
    (CHAT, {"messages": USER, "size": "32x32"}, 400, "size", "modalities"),
    (CHAT, {"messages": USER, "cfg_text_scale": 2}, 400, "cfg_text_scale", "modalities"),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature", "temperature"),  # vLLM's own check
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "at least 1"),  # vLLM's own check
    (CHAT, {"messages": USER, "modalities": ["audio"]}, 400, "modalities", "text"),
    # partial images are streamed: asked for without `stream`, refused
    (CHAT, {"messages": USER, "modalities": ["image"], "partial_images": 1}, 400, "partial_images",
     "needs `stream: true`"),
    (CHAT, {"messages": [{"role": "system", "content": "hi"}], "modalities": ["image"]}, 400, "messages",
     "no user message"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}], "modalities": ["image"]}, 400,
     "messages", "input_audio"),
    (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}], "modalities": ["image"]}, 400,
     "messages.content.image_url",
     "--allowed-local-media-path"),
    (EDITS, {"prompt": "x"}, 400, "image", "`image` is required"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_requests(omni_server, path, body, status, param, fragment):
    assert_openai_error(omni_server("bagel"), path, body, status, param, fragment)


def test_error_bodies_of_every_layer(omni_server):
    """vLLM's app answers 401 / 404 / 405 / 413 / multipart / its own validation in the OpenAI shape."""
    server = omni_server("bagel")
    assert_framework_errors_shaped(server, completions_422=True)
    # a text request vLLM refuses by its media rules: vLLM's own answer, untouched (vLLM 0.32 says 500
    # for it; docs/server.md lists it under vLLM's behaviour), in the OpenAI shape, the file not read
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "x"}]}]}
    r = requests.post(server.url + CHAT, json=body, headers=server.headers(), timeout=60)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code >= 400, r.text
    assert "--allowed-local-media-path" in err["message"] and "root:" not in r.text


def test_meta_routes_and_still_serving(omni_server):
    server = omni_server("bagel")
    client = server.client()
    # vLLM's own model card (--max-model-len 512 beat the stage config), with the family's declaration
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] == 512
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    # vLLM's OpenAPI document shows the omni bodies, BAGEL's own knobs in them
    document = requests.get(server.url + "/openapi.json", timeout=30).json()
    assert_omni_bodies(document, knobs=("cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type"))
    r = client.images.generate(prompt="still here", size="32x32", extra_body={"seed": 2})
    # omitted steps: --default-sampling-params (3) beat the stage config's dit default (4)
    assert r.model_extra["omni"]["resolved"]["num_inference_steps"] == 3
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0].message.content
    m = server.metrics()
    assert m["omni_engine_requests_failed"] == 0  # bad input never reached the DiT stage
    assert m["omni_engine_requests_in_flight"] == 0


def test_queue_limit_and_disconnect_abort(omni_server):
    """--omni-max-queue 1: a slow image request fills the pipeline, a second one gets 503; the
    first client hangs up and its DiT work is aborted long before its 200 steps end."""
    server = omni_server("bagel")
    before = server.metrics()
    # 8 images of the default (largest) size with text CFG: 16 rows per step, 200 steps
    slow = {"prompt": "slow", "num_inference_steps": 200, "n": 8, "negative_prompt": "fast", "seed": 1}
    outcome: list[str] = []

    def hang_up() -> None:
        try:
            r = requests.post(server.url + GEN, json=slow, headers=server.headers(), timeout=2.0)
            outcome.append(f"answered {r.status_code}")
        except requests.exceptions.ReadTimeout:
            outcome.append("disconnected")

    t = threading.Thread(target=hang_up)
    t.start()
    deadline = time.monotonic() + 3
    while server.metrics()["omni_engine_requests_in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = requests.post(server.url + GEN, json={"prompt": "second", "size": "32x32"}, headers=server.headers(), timeout=30)
    assert r.status_code == 503, r.text
    assert "--omni-max-queue 1" in r.json()["error"]["message"]
    t.join()
    assert outcome == ["disconnected"]

    assert_aborted_and_idle(server, before, aborted=1, rejected=1, max_steps=199)
    assert server.client().images.generate(prompt="after", size="32x32", extra_body={"seed": 3}).data
