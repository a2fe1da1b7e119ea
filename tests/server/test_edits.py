"""/v1/images/edits (multipart upload, JSON image URL) and chat with an input
image vs offline edits: byte-identical pixels. Served through `vllm-omni serve`
(the collision-free CLI) with --allowed-local-media-path."""

from __future__ import annotations

import base64

import pytest
import requests
from PIL import Image

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import first_image_md5, pil_md5, png_bytes, striped_image
from .offline import comparable, offline

pytestmark = pytest.mark.engine


def _input_image() -> Image.Image:
    return striped_image(48, 40)


def test_edit_upload_url_chat_offline_identical(omni_server, checkpoint):
    server = omni_server("qwen-image-edit")
    client = server.client()
    image = _input_image()
    png = png_bytes(image)
    (server.extra["media_dir"] / "in.png").write_bytes(png)

    upload = client.images.edit(image=("in.png", png, "image/png"), prompt="make it blue", size="64x64",
                                extra_body={"seed": 4})
    by_url = requests.post(
        server.url + "/v1/images/edits", headers=server.headers(), timeout=300,
        json={"prompt": "make it blue", "size": "64x64", "seed": 4,
              "images": [{"image_url": f"file://{server.extra['media_dir'] / 'in.png'}"}]},
    )
    assert by_url.status_code == 200, by_url.text
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    chat = client.chat.completions.create(
        model=str(server.model),
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                               {"type": "text", "text": "make it blue"}]}],
        extra_body={"seed": 4, "size": "64x64"},
    )
    off = offline(checkpoint, "qwen-image-edit").generate(
        "make it blue", SamplingParams(images=[image], seed=4, width=64, height=64)
    )[0]

    md5 = pil_md5(off.images[0])
    assert [first_image_md5(a) for a in (upload, by_url.json(), chat)] == [md5] * 3
    resolved = comparable(off.params.public_dict())
    assert resolved["num_inference_steps"] == 2  # the server's stage default, same offline
    assert upload.model_extra["omni"]["resolved"] == resolved
    assert chat.model_extra["omni"]["resolved"] == resolved


def test_edit_errors(omni_server, tmp_path):
    server = omni_server("qwen-image-edit")
    h = server.headers()
    url = server.url + "/v1/images/edits"
    png = png_bytes(_input_image())
    cases = [
        (dict(data={"prompt": "x"}, files={"image": ("a.png", b"garbage", "image/png")}), 400, "could not be decoded"),
        (dict(data={"prompt": "x"}), 400, "`image` is required"),
        (dict(data={"size": "64x64"}, files={"image": ("a.png", png, "image/png")}), 400, "`prompt` is required"),
        (dict(data={"prompt": "x"}, files={"image": ("a.png", png, "image/png"), "mask": ("m.png", png, "image/png")}),
         400, "`mask` is not supported"),
        (dict(data={"prompt": "x", "n": "0"}, files={"image": ("a.png", png, "image/png")}), 400, "positive integer"),
        # Qwen-Image-Edit takes one image (Edit Plus takes several): a second one is refused, not dropped
        (dict(data={"prompt": "x"}, files=[("image[]", ("a.png", png, "image/png"))] * 2), 400,
         "exactly 1 input image, got 2"),
        # outside --allowed-local-media-path
        (dict(json={"prompt": "x", "images": [{"image_url": "file:///etc/hostname"}]}), 400, "must be a subpath"),
        (dict(json={"prompt": "x", "images": [{"image_url": "ftp://example.com/a.png"}]}), 400, "HTTP, data or file"),
    ]
    for kwargs, status, fragment in cases:
        r = requests.post(url, headers=h, timeout=60, **kwargs)
        assert r.status_code == status, (fragment, r.text)
        assert fragment in r.json()["error"]["message"], r.text
    # text-to-image on an edit model: the model's own rule, still a 400
    r = requests.post(server.url + "/v1/images/generations", headers=h, json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and "needs exactly 1 input image" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "image"
