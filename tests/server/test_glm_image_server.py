"""`vllm serve <tiny GLM-Image> --omni`: HTTP equals the offline `Omni`, byte for byte.

One real server (AR stage on vLLM's CPU engine, DiT stage inline) on the same
deterministic-AR checkpoint as the session's offline `Omni` (`glm_omni`), real
`openai` client: /v1/images/generations and /v1/chat/completions at a
non-square size give the offline pixels, and so do /v1/images/edits and chat
with an image part (image-to-image); a size GLM-Image cannot render is a 400
naming the allowed sizes; a text answer is refused (images only).
"""

from __future__ import annotations

import base64

import pytest
import requests

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import assert_openai_error, b64_png, check_image_stream, decoded_md5, offline_partials, pil_md5, png_bytes
from .offline import comparable
from .openapi_bodies import assert_omni_bodies

pytestmark = pytest.mark.engine

MODEL = "tiny-glm-image"
PROMPT = 'A "GLM" sign on a red wall'


def test_generations_and_chat_equal_offline(omni_server, glm_omni):
    client = omni_server("glm-image").client()
    ext = {"seed": 7, "num_inference_steps": 3}
    http = client.images.generate(model=MODEL, prompt=PROMPT, size="448x256", extra_body=ext)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], modalities=["image"],
        extra_body={**ext, "size": "448x256"},
    )
    (off,) = glm_omni.generate([PROMPT], SamplingParams(seed=7, num_inference_steps=3, width=448, height=256))

    md5 = pil_md5(off.images[0])
    assert off.images[0].size == (448, 256) and http.size == "448x256"
    assert decoded_md5(base64.b64decode(http.data[0].b64_json)) == md5
    parts = chat.choices[0].message.content
    assert [decoded_md5(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])) for p in parts] == [md5]
    assert http.model_extra["omni"]["resolved"] == comparable(off.params.public_dict())


def test_generations_stream_partial_images(omni_server, glm_omni):
    """GLM-Image's DiT stage streams through the multi-stage path (docs/server.md, "Streaming partial
    images"): partial images after steps 1 and 2 of 3, of the output size, decoded from flow
    matching's x0 by its VAE; the completed image byte for byte the unstreamed answer; the offline
    Omni's on_event gets the same partial pixels."""
    client = omni_server("glm-image").client()
    args = dict(model=MODEL, prompt=PROMPT, size="256x256", extra_body={"seed": 5, "num_inference_steps": 3})
    events = list(client.images.generate(**args, stream=True, partial_images=2))
    partial, completed = check_image_stream(events, "image_generation", n=1, k=2, size="256x256")
    plain = client.images.generate(**args)
    assert completed[0].b64_json == plain.data[0].b64_json
    assert len({e.b64_json for e in partial + completed}) == 3  # each a different estimate
    out, md5s = offline_partials(glm_omni, SamplingParams(prompt=PROMPT, width=256, height=256, seed=5,
                                                          num_inference_steps=3, partial_images=2))
    assert md5s == [pil_md5(b64_png(e.b64_json)) for e in partial]
    assert pil_md5(out.images[0]) == pil_md5(b64_png(plain.data[0].b64_json))


def test_a_size_it_cannot_render_is_a_400_naming_the_allowed_sizes(omni_server):
    server = omni_server("glm-image")
    body = {"model": MODEL, "prompt": PROMPT, "size": "250x256"}
    assert_openai_error(server, "/v1/images/generations", body, 400, "size", "multiples of 32 between 256 and 2048")
    # The server keeps serving.
    ok = server.client().images.generate(model=MODEL, prompt=PROMPT, size="256x256", extra_body={"seed": 1})
    assert ok.size == "256x256"


def test_text_answers_are_refused(omni_server):
    server = omni_server("glm-image")
    # (left out, `modalities` means images here: the family declares no text output)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "modalities": ["text"]}
    assert_openai_error(server, "/v1/chat/completions", body, 400, "modalities", "answers with images, not text")
    # what it does take is in vLLM's OpenAPI document: the omni bodies, GLM-Image's own field in them
    assert_omni_bodies(requests.get(server.url + "/openapi.json", timeout=30).json(), knobs=("max_sequence_length",))


def test_a_size_beyond_the_ar_stages_context_is_a_400(omni_server):
    """1024x1024 needs 1024 + 256 + 1 generated tokens; this server's AR stage holds 1024 (max_model_len)."""
    server = omni_server("glm-image")
    body = {"model": MODEL, "prompt": PROMPT, "size": "1024x1024"}
    assert_openai_error(server, "/v1/images/generations", body, 400, "size", "max_model_len")


def test_image_to_image_edits_and_chat_equal_offline(omni_server, glm_omni):
    from test_glm_image_vllm import source_image

    client = omni_server("glm-image").client()
    image = source_image()
    png = png_bytes(image)  # lossless: the server decodes these very pixels
    ext = {"seed": 4, "num_inference_steps": 3}
    edit = client.images.edit(model=MODEL, image=("in.png", png, "image/png"), prompt=PROMPT, extra_body=ext)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    chat = client.chat.completions.create(
        model=MODEL, modalities=["image"], extra_body=ext,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": PROMPT}]}],
    )
    (off,) = glm_omni.generate([PROMPT], SamplingParams(images=[image], **ext))
    md5 = pil_md5(off.images[0])
    assert off.images[0].size == (320, 256)  # no size given: the source image's
    assert decoded_md5(base64.b64decode(edit.data[0].b64_json)) == md5
    parts = chat.choices[0].message.content
    assert [decoded_md5(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])) for p in parts] == [md5]
