"""FLUX.1 and FLUX.1 Kontext over `vllm serve <tiny checkpoint> --omni` with the openai client == offline `Omni`.

Every route a FLUX model serves: /v1/images/generations and /v1/chat/completions (modalities
image) for both; /v1/images/edits (multipart upload) and chat image parts for Kontext. Decoded
pixels are byte-identical to offline `Omni` on the same seed, and the resolved parameters are
the same; what FLUX does not read is refused with a 400 naming the field, as for the other
families. (Offline `Omni` itself == diffusers: tests/diffusion/test_flux.py.)
"""

from __future__ import annotations

import base64
import concurrent.futures
import io

import numpy as np
import pytest
import requests
from PIL import Image

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import decoded_md5, pil_md5, png_bytes, striped_image
from .offline import comparable, offline

pytestmark = pytest.mark.engine


def _images(answer) -> list[str]:
    """decoded_md5 of every image of an images-route answer or a chat answer."""
    if hasattr(answer, "choices"):
        parts = answer.choices[0].message.content
        return [decoded_md5(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])) for p in parts]
    return [decoded_md5(base64.b64decode(d.b64_json)) for d in answer.data]


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _post_error(server, path: str, param: str, fragment: str, **kwargs) -> None:
    r = requests.post(server.url + path, headers=server.headers(), timeout=120, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


def test_flux_generations_and_chat_match_offline(omni_server, checkpoint):
    server = omni_server("flux")
    client = server.client()
    ext = {"seed": 7, "guidance_scale": 5.0, "negative_prompt": "blurry", "true_cfg_scale": 2.0,
           "max_sequence_length": 64}
    http = client.images.generate(prompt="a red cat", n=2, size="96x64", extra_body=ext)
    chat = client.chat.completions.create(
        model=str(server.model), messages=[{"role": "user", "content": "a red cat"}],
        extra_body={**ext, "n": 2, "size": "96x64", "modalities": ["image"]},
    )
    off = offline(checkpoint, "flux").generate(
        "a red cat", SamplingParams(**ext, num_outputs_per_prompt=2, width=96, height=64))[0]

    md5 = [pil_md5(img) for img in off.images]
    assert _images(http) == md5 and _images(chat) == md5 and len(set(md5)) == 2
    resolved = comparable(off.params.public_dict())
    assert resolved["true_cfg_scale"] == 2.0 and resolved["guidance_scale"] == 5.0
    assert http.model_extra["omni"]["resolved"] == resolved == chat.model_extra["omni"]["resolved"]


def test_flux_omitted_values_resolve_alike_on_every_path(omni_server, checkpoint):
    server = omni_server("flux")
    client = server.client()
    http = client.images.generate(prompt="a small boat", extra_body={"seed": 11})
    chat = client.chat.completions.create(model=str(server.model), messages=[{"role": "user", "content": "a small boat"}],
                                          extra_body={"seed": 11})
    off = offline(checkpoint, "flux").generate("a small boat", SamplingParams(seed=11))[0]
    resolved = comparable(off.params.public_dict())
    # stage defaults (server flag) for steps and size; FLUX's own for guidance and text length
    assert (resolved["num_inference_steps"], resolved["width"], resolved["height"]) == (2, 64, 64)
    assert (resolved["guidance_scale"], resolved["max_sequence_length"]) == (3.5, 512)
    assert resolved["true_cfg_scale"] is None and resolved["negative_prompt"] is None
    assert http.model_extra["omni"]["resolved"] == resolved == chat.model_extra["omni"]["resolved"]
    assert _images(http) == _images(chat) == [pil_md5(off.images[0])]


def test_flux_concurrent_requests_share_steps_and_match_offline(omni_server, checkpoint):
    """Three clients at once, different prompts, seeds and sizes: the engine steps the two 64x64
    requests together (fewer engine steps than request steps), and every answer is offline `Omni`'s
    run alone within 1 uint8 level (rows sharing a forward move floats by ~1e-6, which can flip a
    rounding; tests/diffusion/test_flux.py measures it against the same run unbatched)."""
    server = omni_server("flux")
    client = server.client()
    asks = [("a red cat", 1, "64x64"), ("a much longer prompt about a blue dog on a beach", 2, "64x64"),
            ("mountains", 3, "96x32")]
    before = server.metrics()
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: client.images.generate(
            prompt=a[0], size=a[2], extra_body={"seed": a[1], "num_inference_steps": 8}), asks))
    after = server.metrics()
    advanced = after["omni_engine_step_requests_sum"] - before["omni_engine_step_requests_sum"]
    steps = after["omni_engine_step_seconds_count"] - before["omni_engine_step_seconds_count"]
    assert advanced == 8 * len(asks) and steps < advanced, (steps, advanced)
    for (prompt, seed, size), answer in zip(asks, answers):
        width, height = map(int, size.split("x"))
        off = offline(checkpoint, "flux").generate(
            prompt, SamplingParams(seed=seed, width=width, height=height, num_inference_steps=8))[0]
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))), dtype=int)
        assert served.shape == (height, width, 3)
        assert np.abs(served - np.asarray(off.images[0], dtype=int)).max() <= 1, prompt


def test_flux_refuses_what_it_does_not_read(omni_server):
    server = omni_server("flux")
    for field, value in (("guidance_scale_2", 2.0), ("layers", 2), ("num_frames", 5)):
        _post_error(server, "/v1/images/generations", field, "not used by this model",
                    json={"prompt": "x", field: value})
    _post_error(server, "/v1/images/generations", "max_sequence_length",
                "max_sequence_length must be an integer in [1, 512]",
                json={"prompt": "x", "max_sequence_length": 600})
    _post_error(server, "/v1/images/edits", "image", "does not take input images",
                data={"prompt": "x"}, files={"image": ("a.png", png_bytes(striped_image(32, 32)), "image/png")})
    caps = requests.get(server.url + "/v1/models", headers=server.headers()).json()["data"][0]["omni"]["capabilities"]
    assert caps["output"] == "image" and caps["input_images"] == {"min": 0, "max": 0}
    assert "guidance_scale" in caps["fields"] and "true_cfg_scale" in caps["fields"]


def test_flux_streams_partial_images(omni_server):
    """FLUX streams as Qwen-Image does (test_image_streaming.py): partial images of the output size,
    the completed image byte for byte the non-streamed one."""
    server = omni_server("flux")
    client = server.client()
    args = dict(prompt="a red fox", size="64x64", extra_body={"seed": 5, "num_inference_steps": 3})
    events = list(client.images.generate(**args, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partials = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events[:2]]
    assert [(p.format, p.size) for p in partials] == [("PNG", (64, 64))] * 2
    assert events[-1].b64_json == client.images.generate(**args).data[0].b64_json


def test_kontext_edits_and_chat_match_offline(omni_server, checkpoint):
    server = omni_server("flux-kontext")
    client = server.client()
    image = striped_image(48, 40)
    png = png_bytes(image)
    ext = {"seed": 3, "max_sequence_length": 32}
    upload = client.images.edit(image=("in.png", png, "image/png"), prompt="make it blue", extra_body=ext)
    chat = client.chat.completions.create(
        model=str(server.model),
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                               {"type": "text", "text": "make it blue"}]}],
        extra_body={**ext, "modalities": ["image"]},
    )
    text_only = client.images.generate(prompt="a blue house", extra_body={**ext, "max_area": 32 * 64})
    omni = offline(checkpoint, "flux-kontext")
    off = omni.generate("make it blue", SamplingParams(images=[image], **ext))[0]
    off_text = omni.generate("a blue house", SamplingParams.from_dict({**ext, "max_area": 32 * 64}))[0]

    assert _images(upload) == _images(chat) == [pil_md5(off.images[0])]
    resolved = comparable(off.params.public_dict())
    assert resolved["num_input_images"] == 1 and resolved["extra"]["max_area"] == 4096  # the stage default
    assert upload.model_extra["omni"]["resolved"] == resolved == chat.model_extra["omni"]["resolved"]
    assert _images(text_only) == [pil_md5(off_text.images[0])]
    assert text_only.model_extra["omni"]["resolved"] == comparable(off_text.params.public_dict())
    # the input image was used: another image changes the answer
    other = client.images.edit(image=("o.png", png_bytes(striped_image(40, 48)), "image/png"), prompt="make it blue",
                               extra_body=ext)
    assert _images(other) != _images(upload)


def test_kontext_refuses_what_it_does_not_take(omni_server):
    server = omni_server("flux-kontext")
    png = png_bytes(striped_image(32, 32))
    _post_error(server, "/v1/images/edits", "image", "at most 1 input image, got 2",
                data={"prompt": "x"}, files=[("image[]", ("a.png", png, "image/png"))] * 2)
    _post_error(server, "/v1/images/edits", "guidance_scale_2", "not used by this model",
                data={"prompt": "x", "guidance_scale_2": "3"}, files={"image": ("a.png", png, "image/png")})
    _post_error(server, "/v1/images/generations", "max_area", "max_area must be a positive integer",
                json={"prompt": "x", "max_area": 0})
    caps = requests.get(server.url + "/v1/models", headers=server.headers()).json()["data"][0]["omni"]["capabilities"]
    assert caps["input_images"] == {"min": 0, "max": 1} and caps["knobs"] == {"max_area": "int"}
