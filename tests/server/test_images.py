"""Offline `Omni.generate` vs /v1/images/generations vs /v1/chat/completions:
byte-identical decoded pixels for the same seed and parameters, and the same
resolved parameters when parameters are omitted (real server, openai client)."""

from __future__ import annotations

import base64

import pytest

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import decoded_md5, pil_md5
from .offline import comparable, offline

pytestmark = pytest.mark.engine

MODEL = "tiny-qwen-image"


def _chat_images(resp) -> list[bytes]:
    parts = resp.choices[0].message.content
    assert isinstance(parts, list) and all(p["type"] == "image_url" for p in parts)
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts]


def test_offline_images_chat_identical(omni_server, checkpoint):
    server = omni_server("qwen-image")
    client = server.client()
    ext = {"seed": 7, "num_inference_steps": 3, "negative_prompt": "blurry"}  # negative prompt: true CFG on

    http = client.images.generate(model=MODEL, prompt="a red cat", n=2, size="64x48", extra_body=ext)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a red cat"}], extra_body={**ext, "n": 2, "size": "64x48"}
    )
    off = offline(checkpoint, "qwen-image").generate(
        "a red cat",
        SamplingParams(seed=7, num_inference_steps=3, negative_prompt="blurry", num_outputs_per_prompt=2, width=64, height=48),
    )[0]

    offline_md5 = [pil_md5(img) for img in off.images]
    assert [decoded_md5(base64.b64decode(d.b64_json)) for d in http.data] == offline_md5
    assert [decoded_md5(b) for b in _chat_images(chat)] == offline_md5
    assert len(set(offline_md5)) == 2  # two different images, diffusers batch semantics
    assert http.size == "64x48"
    resolved = comparable(off.params.public_dict())
    assert http.model_extra["omni"]["resolved"] == resolved
    assert chat.model_extra["omni"]["resolved"] == resolved


def test_omitted_params_resolve_to_defaults_on_every_path(omni_server, checkpoint):
    server = omni_server("qwen-image")
    client = server.client()
    http = client.images.generate(prompt="a small boat", extra_body={"seed": 11})
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "a small boat"}]}],
        extra_body={"seed": 11},
    )
    off = offline(checkpoint, "qwen-image").generate("a small boat", SamplingParams(seed=11))[0]

    resolved = comparable(off.params.public_dict())
    # stage defaults (server flag) for steps and size, the pipeline's own for the rest
    assert (resolved["num_inference_steps"], resolved["width"], resolved["height"]) == (2, 64, 64)
    # no negative prompt: true CFG does not run, and is reported off
    assert resolved["true_cfg_scale"] is None and resolved["max_sequence_length"] == 512
    assert resolved["num_outputs_per_prompt"] == 1
    assert http.model_extra["omni"]["resolved"] == resolved
    assert chat.model_extra["omni"]["resolved"] == resolved
    md5 = pil_md5(off.images[0])
    assert decoded_md5(base64.b64decode(http.data[0].b64_json)) == md5
    assert decoded_md5(_chat_images(chat)[0]) == md5


def test_unseeded_request_reports_its_seed_and_replays(omni_server, checkpoint):
    client = omni_server("qwen-image").client()
    http = client.images.generate(prompt="a lighthouse")
    seed = http.model_extra["omni"]["resolved"]["seed"]
    assert isinstance(seed, int)
    off = offline(checkpoint, "qwen-image").generate("a lighthouse", SamplingParams(seed=seed))[0]
    assert decoded_md5(base64.b64decode(http.data[0].b64_json)) == pil_md5(off.images[0])


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_formats(omni_server, fmt, magic):
    client = omni_server("qwen-image").client()
    r = client.images.generate(prompt="a tree", output_format=fmt, extra_body={"seed": 1})
    data = base64.b64decode(r.data[0].b64_json)
    assert data.startswith(magic) and r.output_format == fmt
    if fmt != "jpeg":  # png and (default, lossless) webp keep the pixels
        png = client.images.generate(prompt="a tree", extra_body={"seed": 1})
        assert decoded_md5(data).split() == decoded_md5(base64.b64decode(png.data[0].b64_json)).split()


def test_fields_without_effect_are_listed_as_ignored(omni_server):
    """OpenAI fields clients send by default (quality, style ...) and chat sampling values on an
    image answer are accepted and named in `omni.ignored`; a request without them has none."""
    server = omni_server("qwen-image")
    client = server.client()
    r = client.images.generate(model=MODEL, prompt="a boat", quality="hd", style="vivid", user="u1",
                               extra_body={"seed": 2})
    assert r.model_extra["omni"]["ignored"] == ["quality", "style"]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a boat"}],
                                          temperature=0.7, max_tokens=30, extra_body={"seed": 2})
    assert sorted(chat.model_extra["omni"]["ignored"]) == ["max_tokens", "temperature"]
    assert decoded_md5(_chat_images(chat)[0]) == decoded_md5(base64.b64decode(r.data[0].b64_json))
    plain = client.images.generate(model=MODEL, prompt="a boat", extra_body={"seed": 2})
    assert plain.model_extra["omni"]["ignored"] == []
