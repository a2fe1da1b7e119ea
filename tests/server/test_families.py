"""Families on the routes they declare, over HTTP with the openai client; offline == HTTP byte-identical.

* Qwen-Image-Layered: /v1/images/edits with background=transparent -> RGBA layers;
* Qwen-Image-Edit Plus: several input images (multipart `image[]`, JSON URLs, chat parts);
* Wan2.2 I2V: /v1/videos with `input_reference` -> the offline frames;
* Wan2.2 TI2V-5B: /v1/videos with and without `input_reference` from one checkpoint;

and each refuses what its declaration says it does not take (400 naming the field).
"""

from __future__ import annotations

import base64
import io
import hashlib
import time

import numpy as np
import pytest
import requests
from PIL import Image

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import b64_png, check_image_stream, decoded_md5, first_image_md5, pil_md5, png_bytes, striped_image
from .offline import comparable, offline

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _post_error(server, path: str, status: int, param: str, fragment: str, **kwargs) -> None:
    r = requests.post(server.url + path, headers=server.headers(), timeout=120, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


def test_layered_transparent_layers_match_offline(omni_server, checkpoint):
    server = omni_server("qwen-image-layered")
    client = server.client()
    image = striped_image(48, 40)
    png = png_bytes(image)
    http = client.images.edit(image=("in.png", png, "image/png"), prompt="split it", background="transparent",
                              extra_body={"seed": 3, "layers": 2, "negative_prompt": " "})
    chat = client.chat.completions.create(
        model=str(server.model),
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                               {"type": "text", "text": "split it"}]}],
        extra_body={"seed": 3, "layers": 2, "negative_prompt": " ", "background": "transparent",
                    "modalities": ["image"]},
    )
    off = offline(checkpoint, "qwen-image-layered").generate(
        "split it", SamplingParams(images=[image], seed=3, layers=2, negative_prompt=" "))[0]

    assert off.kind == "layers" and len(off.layers[0]) == 2
    md5 = [pil_md5(layer) for layer in off.layers[0]]
    layers = [base64.b64decode(d.b64_json) for d in http.data]
    assert [decoded_md5(b) for b in layers] == md5
    assert all(Image.open(io.BytesIO(b)).mode == "RGBA" for b in layers)
    assert http.background == "transparent"
    chat_layers = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in chat.choices[0].message.content]
    assert [decoded_md5(b) for b in chat_layers] == md5
    resolved = comparable(off.params.public_dict())
    assert http.model_extra["omni"]["resolved"] == resolved == chat.model_extra["omni"]["resolved"]
    assert resolved["true_cfg_scale"] == 4.0 and resolved["layers"] == 2  # negative prompt given: CFG ran

    # streamed (docs/server.md, "Streaming partial images"): a partial image of a layered request is
    # one event per layer (`index`: the layer's place in `data`), the completed layers byte for byte
    # the unstreamed ones; 2 steps give 1 partial image of the 2 asked (OpenAI allows fewer)
    events = list(client.images.edit(image=("in.png", png, "image/png"), prompt="split it", background="transparent",
                                     stream=True, partial_images=2,
                                     extra_body={"seed": 3, "layers": 2, "negative_prompt": " "}))
    partial, completed = check_image_stream(events, "image_edit", n=2, k=1, size=http.size, background="transparent")
    assert [e.b64_json for e in completed] == [d.b64_json for d in http.data]
    assert all(b64_png(e.b64_json).mode == "RGBA" for e in partial)
    assert [b64_png(e.b64_json).tobytes() for e in partial] != [b64_png(e.b64_json).tobytes() for e in completed]


def test_layered_refuses_what_it_does_not_take(omni_server):
    server = omni_server("qwen-image-layered")
    png = png_bytes(striped_image(48, 40))
    one = {"image": ("a.png", png, "image/png")}
    _post_error(server, "/v1/images/generations", 400, "image", "needs exactly 1 input image",
                json={"prompt": "x"})
    _post_error(server, "/v1/images/edits", 400, "size", "not used by this model",
                data={"prompt": "x", "size": "64x64"}, files=one)
    _post_error(server, "/v1/images/edits", 400, "guidance_scale", "not used by this model",
                data={"prompt": "x", "guidance_scale": "3"}, files=one)
    _post_error(server, "/v1/images/edits", 400, "background", "transparent RGBA layers",
                data={"prompt": "x", "background": "opaque"}, files=one)
    _post_error(server, "/v1/images/edits", 400, "image", "exactly 1 input image, got 2",
                data={"prompt": "x"}, files=[("image[]", ("a.png", png, "image/png"))] * 2)
    caps = requests.get(server.url + "/v1/models", headers=server.headers()).json()["data"][0]["omni"]["capabilities"]
    assert caps["output"] == "layers" and caps["input_images"] == {"min": 1, "max": 1}
    assert caps["knobs"] == {"cfg_normalize": "bool", "use_en_prompt": "bool"}


def test_edit_plus_several_images_on_every_route_match_offline(omni_server, checkpoint):
    server = omni_server("qwen-image-edit-plus")
    client = server.client()
    images = [striped_image(48, 40), striped_image(32, 48).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    pngs = [png_bytes(img) for img in images]
    for i, png in enumerate(pngs):
        (server.extra["media_dir"] / f"plus{i}.png").write_bytes(png)
    ext = {"seed": 6, "negative_prompt": " "}

    upload = client.images.edit(image=[(f"{i}.png", png, "image/png") for i, png in enumerate(pngs)],
                                prompt="the cat of picture 1 on the mat of picture 2", size="64x64", extra_body=ext)
    by_url = requests.post(
        server.url + "/v1/images/edits", headers=server.headers(), timeout=300,
        json={"prompt": "the cat of picture 1 on the mat of picture 2", "size": "64x64", **ext,
              "images": [{"image_url": f"file://{server.extra['media_dir'] / f'plus{i}.png'}"} for i in range(2)]},
    )
    assert by_url.status_code == 200, by_url.text
    chat = client.chat.completions.create(
        model=str(server.model),
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(pngs[0])}},
            {"type": "image_url", "image_url": {"url": _data_url(pngs[1])}},
            {"type": "text", "text": "the cat of picture 1 on the mat of picture 2"}]}],
        extra_body={**ext, "size": "64x64"},
    )
    off = offline(checkpoint, "qwen-image-edit-plus").generate(
        "the cat of picture 1 on the mat of picture 2",
        SamplingParams(images=images, width=64, height=64, **ext))[0]

    md5 = pil_md5(off.images[0])
    assert [first_image_md5(a) for a in (upload, by_url.json(), chat)] == [md5] * 3
    resolved = comparable(off.params.public_dict())
    assert resolved["num_input_images"] == 2
    assert upload.model_extra["omni"]["resolved"] == resolved == chat.model_extra["omni"]["resolved"]
    # one image only changes the answer: the second image was used
    single = client.images.edit(image=("0.png", pngs[0], "image/png"),
                                prompt="the cat of picture 1 on the mat of picture 2", size="64x64", extra_body=ext)
    assert decoded_md5(base64.b64decode(single.data[0].b64_json)) != md5


def _frames_md5(mp4_path) -> list[str]:
    import av

    with av.open(str(mp4_path)) as container:
        return [hashlib.md5(np.ascontiguousarray(f.to_ndarray(format="rgb24")).tobytes()).hexdigest()
                for f in container.decode(video=0)]


def _video_matches_offline(server, checkpoint, family, tmp_path, image=None) -> dict:
    """POST /v1/videos (with `input_reference` if `image`), wait, and compare its mp4 frames and resolved
    parameters with offline `Omni` on the same seed; returns the resolved parameters."""
    client = server.client()
    ref = {} if image is None else {"input_reference": ("in.png", png_bytes(image), "image/png")}
    job = client.videos.create(prompt="the stripes wave", extra_body={"seed": 4, "negative_prompt": "still"}, **ref)
    deadline = time.monotonic() + 300
    while (v := client.videos.retrieve(job.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, v
        time.sleep(0.3)
    assert v.status == "completed", v
    served = tmp_path / f"served-{job.id}.mp4"
    served.write_bytes(client.videos.download_content(job.id).read())

    images = [image] if image is not None else None
    off = offline(checkpoint, family).generate(
        "the stripes wave", SamplingParams(images=images, seed=4, negative_prompt="still"))[0]
    resolved = v.model_extra["omni"]["resolved"]
    assert resolved == comparable(off.params.public_dict())
    assert _frames_md5(served) == _frames_md5(off.save_mp4(tmp_path / f"offline-{job.id}.mp4"))
    return resolved


def test_wan_i2v_input_reference_matches_offline(omni_server, checkpoint, tmp_path):
    server = omni_server("wan2.2-i2v")
    image = striped_image(48, 32)
    png = png_bytes(image)
    assert _video_matches_offline(server, checkpoint, "wan2.2-i2v", tmp_path, image)["num_input_images"] == 1

    _post_error(server, "/v1/videos", 400, "image", "needs exactly 1 input image; use /v1/videos with",
                data={"prompt": "no reference"})
    _post_error(server, "/v1/videos", 400, "true_cfg_scale", "not used by this model",
                data={"prompt": "x", "true_cfg_scale": "4"}, files={"input_reference": ("in.png", png, "image/png")})


def test_wan_ti2v_text_and_image_to_video_match_offline(omni_server, checkpoint, tmp_path):
    server = omni_server("wan2.2-ti2v-5b")
    assert _video_matches_offline(server, checkpoint, "wan2.2-ti2v-5b", tmp_path)["num_input_images"] == 0
    image = striped_image(64, 32)
    resolved = _video_matches_offline(server, checkpoint, "wan2.2-ti2v-5b", tmp_path, image)
    assert resolved["num_input_images"] == 1 and resolved["guidance_scale_2"] is None
    _post_error(server, "/v1/videos", 400, "guidance_scale_2", "not used by this model",
                data={"prompt": "x", "guidance_scale_2": "3"})  # one transformer: no second expert


def test_a_stage_default_the_model_does_not_read_stops_the_server(checkpoint, tmp_path):
    import os
    import subprocess

    from .conftest import VLLM

    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    out = subprocess.run(
        [str(VLLM), "serve", str(checkpoint("qwen-image")), "--omni", "--port", "0",
         "--default-sampling-params", '{"guidance_scale": 3.0}'],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # the CLI's one-line failure (cli_errors.py)
    assert "stage defaults: `guidance_scale` is not used by this model" in out.stderr
    assert "Traceback" not in out.stderr
