"""Issue 10 against the real edit server: every way an image arrives takes one checked path.

The server runs with `--allowed-media-domains 127.0.0.1` and
VLLM_IMAGE_FETCH_TIMEOUT=3 (conftest); a media server of the test's own on
127.0.0.1 serves the images, redirects (to `localhost`, not allowed) and a
slow drip.
"""

from __future__ import annotations

import base64
import time

import pytest
import requests

from .conftest import FETCH_TIMEOUT_S, png_bytes, striped_image
from .images_bad import png_declaring, sparse_png
from .media_server import MediaServer

pytestmark = pytest.mark.engine

EDITS = "/v1/images/edits"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def media():
    with MediaServer(png_bytes(striped_image(32, 32)), drip_s=4 * FETCH_TIMEOUT_S) as server:
        yield server


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def edit_json(url: str) -> dict:
    return {"json": {"prompt": "x", "images": [{"image_url": url}]}}


def chat_json(url: str) -> dict:
    return {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}], "modalities": ["image"]}}


def post(server, path, **kwargs):
    return requests.post(server.url + path, headers=server.headers(), timeout=120, **kwargs)


def assert_400(r, param_prefix: str, fragment: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"].startswith(param_prefix), err


@pytest.mark.parametrize("name,data,fragment", [
    ("50000x50000 header", png_declaring(50000, 50000), "exceeds limit"),
    ("8 KB that decodes to 8000x8000", sparse_png(8000), "decompression bomb"),
], ids=["declared-50000x50000", "8KB-decodes-to-8000x8000"])
def test_image_bombs_are_400_from_every_source(omni_server, media, name, data, fragment):
    server = omni_server("qwen-image-edit")
    media.files["bomb.png"] = data
    sources = [
        (EDITS, {"data": {"prompt": "x"}, "files": {"image": ("a.png", data, "image/png")}}, "image"),
        (EDITS, edit_json(data_url(data)), "image"),
        (EDITS, edit_json(media.url("/file/bomb.png")), "image"),
        (CHAT, chat_json(data_url(data)), "image"),
        (CHAT, chat_json(media.url("/file/bomb.png")), "image"),
    ]
    for path, kwargs, param in sources:
        started = time.monotonic()
        r = post(server, path, **kwargs)
        assert_400(r, param, fragment)
        assert time.monotonic() - started < 3, (name, path, "took", time.monotonic() - started)


def test_redirect_to_a_host_not_allowed_is_refused(omni_server, media):
    server = omni_server("qwen-image-edit")
    for path, body in ((EDITS, edit_json(media.url("/to-local/img.png?edit"))),
                       (CHAT, chat_json(media.url("/to-local/img.png?chat")))):
        assert_400(post(server, path, **body), "", "'localhost' is not one of the allowed media domains")
    assert not [h for h in media.hits if h.startswith("/img.png?")]  # the refused hop was never fetched
    # a redirect that stays on an allowed host is followed: the file behind it reaches the image checks
    media.files["sparse.png"] = sparse_png(8000)
    assert_400(post(server, EDITS, **edit_json(media.url("/to-same/file/sparse.png"))), "image", "decompression bomb")
    assert "/file/sparse.png" in media.hits


def test_slow_drip_media_server_is_cut_at_the_fetch_deadline(omni_server, media):
    server = omni_server("qwen-image-edit")
    started = time.monotonic()
    r = post(server, EDITS, **edit_json(media.url("/drip")))
    elapsed = time.monotonic() - started
    assert_400(r, "images", f"longer than {FETCH_TIMEOUT_S} s")
    assert elapsed < FETCH_TIMEOUT_S + 2, elapsed


def test_deeply_nested_edit_body_is_400(omni_server):
    server = omni_server("qwen-image-edit")
    r = requests.post(server.url + EDITS, data=b"[" * 5000, timeout=60,
                      headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"], r.text
