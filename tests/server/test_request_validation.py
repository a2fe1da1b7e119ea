"""The request layer on its own (no server): bodies, scalars, input images, URL fetches.

Each case here is one of issue 10's reproductions, checked where the fix lives;
the same inputs are sent to the real server in test_edits_media.py, test_fuzz.py
and test_videos_jobs.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vllm_omni_plugin.diffusion.capabilities import Knob
from vllm_omni_plugin.request import (
    FIELDS,
    Limits,
    MediaPolicy,
    RequestError,
    build_sampling_params,
    check_messages,
    decode_image,
    fetch_image_bytes,
    parse_json_object,
)

from .images_bad import png_declaring, sparse_png
from .media_server import MediaServer

LIMITS = Limits()


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"[" * 5000, "nests deeper"),
        (b'{"prompt": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
        (b'{"guidance_scale": NaN}', "NaN"),
        (b'{"guidance_scale": Infinity}', "Infinity"),
        (b'{"guidance_scale": -Infinity}', "-Infinity"),
        (b'{"guidance_scale": 1e999}', "overflows"),
        (b'{"prompt": "\\ud800 lone"}', "lone surrogate"),
        (b'{"\\udfff": 1}', "lone surrogate"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "digits"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_json_bodies_refused(raw, fragment):
    with pytest.raises(RequestError) as err:
        parse_json_object(raw, LIMITS)
    assert err.value.status == 400 and fragment in err.value.message
    json.dumps({"message": err.value.message}).encode("utf-8")  # the error itself is encodable


def test_body_size_limit_is_413():
    with pytest.raises(RequestError) as err:
        parse_json_object(b'{"prompt": "' + b"x" * 2000 + b'"}', Limits(max_body_bytes=1000))
    assert err.value.status == 413


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"guidance_scale": "NaN"}, "guidance_scale"),
        ({"guidance_scale": "inf"}, "guidance_scale"),
        ({"guidance_scale": "-Infinity"}, "guidance_scale"),
        ({"guidance_scale": "1e999"}, "guidance_scale"),
        ({"guidance_scale": 1e308}, "guidance_scale"),
        ({"guidance_scale": -1e308}, "guidance_scale"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale"),
        ({"seconds": "Infinity"}, "seconds"),
        ({"seconds": 1e308}, "seconds"),
        ({"num_inference_steps": "9" * 5000}, "num_inference_steps"),
        ({"negative_prompt": "\ud800"}, "negative_prompt"),
        ({"prompt": "a \udc00 cat"}, "prompt"),
    ],
)
def test_fields_refused(fields, param):
    with pytest.raises(RequestError) as err:
        build_sampling_params({"prompt": "p", **fields}, limits=LIMITS)
    assert err.value.param == param, err.value.message


@pytest.mark.parametrize("data", [png_declaring(50000, 50000), png_declaring(9000, 9000), sparse_png(8000)])
def test_image_bombs_refused_before_decoding(data):
    started = time.perf_counter()
    with pytest.raises(RequestError) as err:
        decode_image(data, LIMITS)
    assert time.perf_counter() - started < 0.5
    assert err.value.param == "image"


def test_an_honest_large_sparse_image_below_the_free_size_decodes():
    img = decode_image(sparse_png(1024), LIMITS)
    assert img.size == (1024, 1024) and img.mode == "RGB"


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty"),
    ("hi", "non-empty"),
    ([{"content": "x"}], "`role`"),
    ([{"role": 5, "content": "x"}], "`role`"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "content[0].text must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": None}}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "unsupported content part"),
    ([{"role": "user", "content": ["x"]}], "unsupported content part"),
])
def test_chat_messages_refused(messages, fragment):
    with pytest.raises(RequestError) as err:
        check_messages(messages)
    assert fragment in err.value.message and err.value.param == "messages"


# ---- URL fetches ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media():
    with MediaServer(small_png(), drip_s=20) as server:
        yield server


def fetch(url, **policy):
    kw = dict(allowed_media_domains=("127.0.0.1",), timeout_s=2.0)
    kw.update(policy)
    return asyncio.run(fetch_image_bytes(url, MediaPolicy(**kw), "image_url"))


def test_fetch_follows_allowed_redirects_only(media):
    assert fetch(media.url("/to-same/img.png")) == media.png
    with pytest.raises(RequestError, match="'localhost' is not one of the allowed media domains"):
        fetch(media.url("/to-local/img.png?from=redirect"))
    assert "/img.png?from=redirect" not in media.hits  # the refused hop was never requested
    with pytest.raises(RequestError, match="follows no redirects"):
        fetch(media.url("/to-same/img.png"), max_redirects=0)
    with pytest.raises(RequestError, match="more than 2 redirects"):
        fetch(media.url("/to-same/to-same/to-same/img.png"), max_redirects=2)


def test_fetch_has_one_deadline_for_a_slow_drip(media):
    started = time.perf_counter()
    with pytest.raises(RequestError, match="longer than 2 s"):
        fetch(media.url("/drip"))
    assert time.perf_counter() - started < 3.0


def test_fetch_limits_and_sources(media, tmp_path):
    media.files["big"] = b"x" * 5000
    with pytest.raises(RequestError, match="larger than"):
        fetch(media.url("/file/big"), max_bytes=4000)
    with pytest.raises(RequestError, match="allowed media domains"):
        fetch(media.url("/img.png", host="localhost"))
    data_url = "data:image/png;base64," + base64.b64encode(media.png).decode()
    assert fetch(data_url) == media.png
    with pytest.raises(RequestError, match="base64"):
        fetch("data:image/png;base64,@@@")
    (tmp_path / "in.png").write_bytes(media.png)
    assert fetch(f"file://{tmp_path}/in.png", allowed_local_media_path=tmp_path) == media.png
    with pytest.raises(RequestError, match="subpath of --allowed-local-media-path"):
        fetch(f"file://{tmp_path}/../{tmp_path.name}/../x.png", allowed_local_media_path=tmp_path)
    with pytest.raises(RequestError, match="file URLs are not allowed"):
        fetch(f"file://{tmp_path}/in.png")
    with pytest.raises(RequestError, match="HTTP, data or file"):
        fetch("ftp://127.0.0.1/x.png")


@pytest.mark.parametrize("url", ["http://[::1", "http://" + "a" * 300 + "/x.png", "http://a..b/x", "http:///x",
                                 "http://127.0.0.1:99999/x", "http://127.0.0.1:1/x", "file:///tmp/a\x00b.png"])
def test_malformed_urls_are_request_errors(url, tmp_path):
    with pytest.raises(RequestError):
        fetch(url, allowed_media_domains=None, allowed_local_media_path=tmp_path)


# ---- property: any wire fields -> RequestError or values that JSON and the engine can carry ---------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["NaN", "-inf", "1e999", "64x64", "auto", "\ud800", "png", "b64_json", "2", "1.5", "9" * 80]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                                  max_size=3),
                       max_leaves=6)
_FIELD_NAMES = st.sampled_from(sorted(FIELDS) + ["cfg_text_scale", "unknown_field"])


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_FIELD_NAMES, _VALUES, max_size=6))
def test_any_fields_validate_or_refuse(fields):
    try:
        params, output, seconds = build_sampling_params(fields, limits=LIMITS, knobs={"cfg_text_scale": Knob(float)},
                                                        require_prompt=False)
    except RequestError as e:
        json.dumps({"message": e.message, "param": e.param}, allow_nan=False).encode("utf-8")
        return
    for value in [*vars(params).values(), *vars(output).values(), seconds]:
        if isinstance(value, float):
            assert math.isfinite(value)
        if isinstance(value, str):
            value.encode("utf-8")
    json.dumps({k: v for k, v in vars(params).items() if k != "images"}, allow_nan=False, default=str)
