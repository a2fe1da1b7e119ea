"""Hypothesis strategies for whole HTTP requests to every omni route (test_fuzz.py, test_videos_jobs.py).

Why hypothesis and not schemathesis: our routes read the raw `Request` (JSON
or multipart, decided per request), so the server's OpenAPI schema has no
request bodies for schemathesis to generate from; a schema written only for it
would be a second, drifting copy of the field table. These strategies mix the
documented fields (docs/server.md) with hostile values: non-finite numbers as
JSON numbers and as strings, huge integers, lone surrogates, wrong types,
unknown keys, deep nesting, non-JSON bytes, image bombs. Values that a server
would *accept* stay cheap (sizes <= 64x64, 1-2 steps, n <= 2) so a run takes
seconds, not minutes.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from .conftest import png_bytes, striped_image
from .images_bad import png_declaring, sparse_png

HOSTILE = [None, True, False, 0, -1, 1, 2, 2.5, -1e308, 1e308, 10**20, -(2**63), 2**64, float("nan"), float("inf"),
           float("-inf"), "NaN", "Infinity", "-inf", "1e999", "", " ", "\ud800", "a\udfffb", "9" * 100, "x" * 300,
           [], {}, [1, 2], {"a": 1}, [[[[[]]]]]]
CHEAP_STEPS = [1, 2, "1", 2.0]
SIZES = ["32x32", "64x64", "auto", "0x0", "32X32", "1x99999", "4096x4096", "axb", "32x32x32", " 32 x 32 "]
FORMATS = ["png", "jpeg", "jpg", "webp", "gif", "b64_json", "url"]
_PNG = png_bytes(striped_image(32, 32))
IMAGES = [_PNG, b"", b"not an image", png_declaring(50000, 50000), sparse_png(8000), _PNG[:40]]

# Small positive numbers are left to the valid values: a hostile 150 steps or 5 seconds of video would be
# valid and only slow.
hostile = (st.sampled_from(HOSTILE) | st.integers(max_value=-1) | st.integers(min_value=10**4)
           | st.floats(min_value=1e6) | st.floats(max_value=-1e-3) | st.text(max_size=20))
text = st.text(max_size=40) | st.sampled_from(["a cat", "\ud800", "x\udc00y", "", "💥" * 5])


VALID_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


def field_values(video: bool = False, model: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Generation fields, a third each: a valid cheap body; a valid body with one field made hostile;
    documented and unknown names with anything in them."""
    valid = {
        "negative_prompt": VALID_TEXT,
        "n": st.sampled_from([1, 2, "1"]),
        "size": st.sampled_from(["32x32", "64x64", "auto", " 32 X 32 "]),
        "num_inference_steps": st.sampled_from(CHEAP_STEPS),
        "guidance_scale": st.floats(0, 20) | st.sampled_from(["3.5", 1]),
        "true_cfg_scale": st.floats(0, 20),
        "seed": st.integers(0, 2**64 - 1),
        "output_format": st.sampled_from(["png", "jpeg", "jpg", "webp"]),
        "output_compression": st.integers(0, 100),
        "response_format": st.just("b64_json"),
        "background": st.sampled_from(["auto", "opaque"]),
        "model": st.sampled_from([model] if model else [None]),
        "user": VALID_TEXT,
        "stream": st.sampled_from([False, None, "false"]),
    }
    if video:
        valid.update({"num_frames": st.sampled_from([1, 5, "5"]), "fps": st.sampled_from([4, 8]),
                      "seconds": st.sampled_from(["0.25", 0.5])})
        del valid["n"], valid["output_format"], valid["output_compression"], valid["background"]
    names = sorted(valid) + ["prompt", "layers", "resolution", "guidance_scale_2", "cfg_scale", "quality", "mask",
                             "bogus", "size", "output_format", "response_format", "background", "stream", "model"]
    wild = {k: st.sampled_from(SIZES + FORMATS) | hostile for k in names}
    base = st.fixed_dictionaries({"prompt": VALID_TEXT}, optional=valid)
    one_bad = st.tuples(base, st.sampled_from(names), hostile).map(lambda t: {**t[0], t[1]: t[2]})
    chaos = st.fixed_dictionaries({}, optional=wild)
    return st.one_of(base, one_bad, chaos)


def json_bytes(body: Any) -> bytes:
    # allow_nan: NaN / Infinity literals go on the wire as a hostile client sends them.
    return json.dumps(body, allow_nan=True).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 6000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "seed": 1e999}',
                     b'{"prompt": "\\ud800"}', b"null", b"[]", b'"x"', b"\xff\xfe{}", b'{"prompt": 1' + b"0" * 5000 + b"}"]),
)


def _json_request(fields: dict[str, Any]) -> dict[str, Any]:
    return {"data": json_bytes(fields), "headers": {"Content-Type": "application/json"}}


def _multipart(fields: dict[str, Any], image_key: str | None, image: bytes | None) -> dict[str, Any]:
    data = {k: (v if isinstance(v, str) else json.dumps(v, allow_nan=True)) for k, v in fields.items() if v is not None}
    # requests encodes form text as UTF-8: a lone surrogate cannot even be sent, so stand in its escape
    data = {k.encode("utf-8", "backslashreplace").decode(): v.encode("utf-8", "backslashreplace").decode()
            for k, v in data.items()}
    files = {image_key: ("in.png", image, "image/png")} if image_key and image is not None else None
    return {"data": data, "files": files}


def _image_ref(media_urls: list[str]) -> st.SearchStrategy[Any]:
    import base64

    data_urls = [f"data:image/png;base64,{base64.b64encode(i).decode()}" for i in IMAGES]
    odd = ["file:///etc/passwd", "file:///tmp/a\x00b", "ftp://x/y.png", "data:,x", "data:image/png;base64,====", "",
           5, "http://[::1", "http://" + "a" * 300 + "/x.png", "http://a..b/x", "http://127.0.0.1:99999/x"]
    return st.sampled_from(data_urls + media_urls + odd) | hostile


def chat_bodies(media_urls: list[str], model: str | None) -> st.SearchStrategy[dict[str, Any]]:
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": text | hostile}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": st.fixed_dictionaries({"url": _image_ref(media_urls)}) | hostile}),
        st.dictionaries(st.sampled_from(["type", "text", "image_url"]), hostile, max_size=2),
        hostile,
    )
    content = text | st.lists(part, max_size=3) | hostile
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]), "content": content})
    valid_message = st.fixed_dictionaries({"role": st.just("user"), "content": VALID_TEXT})
    messages = st.lists(valid_message, min_size=1, max_size=2) | st.lists(message, max_size=3) | hostile
    return st.tuples(field_values(model=model), messages,
                     st.sampled_from([["image"], ["image"], ["text"], None, "image", [], ["audio"]])).map(
        # the prompt comes from the messages (a `prompt` field too is a 400 of its own)
        lambda t: {**{k: v for k, v in t[0].items() if k != "prompt"}, "messages": t[1],
                   **({"modalities": t[2]} if t[2] is not None else {})})


def text_chat_bodies(media_urls: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Chat bodies asking for a text answer (a multi-stage model's AR stage): OpenAI sampling fields."""
    valid = {
        "max_tokens": st.sampled_from([1, 2, 4]),
        "min_tokens": st.sampled_from([0, 1]),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.05, 1),
        "top_k": st.sampled_from([-1, 1, 5]),
        "min_p": st.floats(0, 1),
        "seed": st.integers(0, 2**63 - 1),
        "n": st.sampled_from([1, 2]),
        "stop": st.sampled_from(["x", ["a", "b"]]),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2),
        "modalities": st.sampled_from([["text"], None]),
    }
    names = sorted(valid) + ["max_completion_tokens", "logprobs", "tools", "size", "stream"]
    image = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": _image_ref(media_urls)})})
    content = VALID_TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": VALID_TEXT}) | image,
                                    min_size=1, max_size=2)
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": content}),
                        min_size=1, max_size=3) | hostile
    base = st.fixed_dictionaries({"messages": messages}, optional=valid)
    one_bad = st.tuples(base, st.sampled_from(names), hostile).map(lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(base, one_bad).map(lambda d: {k: v for k, v in d.items() if v is not None})


def requests_for(route: str, media_urls: list[str] = (), model: str | None = None,
                 ) -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    """(method, path, requests kwargs) for one route; `model` is the served name valid bodies may carry."""
    media_urls = list(media_urls)
    raw = raw_bodies.map(lambda b: {"data": b, "headers": {"Content-Type": "application/json"}})
    if route == "generations":
        body = field_values(model=model).map(_json_request) | raw
        return body.map(lambda kw: ("post", "/v1/images/generations", kw))
    if route == "chat":
        body = chat_bodies(media_urls, model).map(_json_request) | raw
        return body.map(lambda kw: ("post", "/v1/chat/completions", kw))
    if route == "text_chat":
        return (text_chat_bodies(media_urls).map(_json_request) | raw).map(
            lambda kw: ("post", "/v1/chat/completions", kw))
    if route == "edits":
        refs = st.lists(st.fixed_dictionaries({"image_url": _image_ref(media_urls)}) | hostile, max_size=2) | hostile
        as_json = st.tuples(field_values(model=model), refs).map(lambda t: _json_request({**t[0], "images": t[1]}))
        as_form = st.tuples(field_values(model=model), st.sampled_from(["image", "image[]", "mask", "other", None]),
                            st.sampled_from(IMAGES + [None])).map(lambda t: _multipart(*t))
        return (as_json | as_form | raw).map(lambda kw: ("post", "/v1/images/edits", kw))
    if route == "videos":
        ref = st.fixed_dictionaries({"image_url": _image_ref(media_urls)}) | hostile
        as_json = st.tuples(field_values(video=True, model=model), st.one_of(st.none(), st.none(), ref)).map(
            lambda t: _json_request({**t[0], **({"input_reference": t[1]} if t[1] is not None else {})}))
        as_form = st.tuples(field_values(video=True, model=model), st.sampled_from(["input_reference", "other", None]),
                            st.sampled_from(IMAGES + [None])).map(lambda t: _multipart(*t))
        return (as_json | as_form | raw).map(lambda kw: ("post", "/v1/videos", kw))
    if route == "video_ids":
        vid = st.sampled_from(["video_" + "0" * 32, "..", "video_../../etc", "%2Fetc%2Fpasswd", "\u0000"]) | st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#"), min_size=1, max_size=40)
        suffix = st.sampled_from(["", "/content", "/content?variant=thumbnail", "/content?variant=video"])
        return st.tuples(st.sampled_from(["get", "delete"]), vid, suffix).map(
            lambda t: (t[0], f"/v1/videos/{t[1]}{t[2] if t[0] == 'get' else ''}", {}))
    if route == "meta":
        return st.tuples(st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/videos", "/v1/videos?limit=x"]),
                         st.sampled_from(["get", "post", "put"])).map(lambda t: (t[1], t[0], {}))
    raise ValueError(route)


def send(server, request: tuple[str, str, dict[str, Any]], counts: dict[int, int]) -> Any:
    """Send one drawn request; count its status; a status >= 500 fails the example."""
    import requests

    method, path, kwargs = request
    kwargs = dict(kwargs)
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    r = requests.request(method, server.url + path, headers=headers, timeout=120, **kwargs)
    counts[r.status_code] = counts.get(r.status_code, 0) + 1
    assert r.status_code < 500, (method, path, repr(kwargs)[:300], r.status_code, r.text[:500])
    return r


ROUTES = ("generations", "chat", "edits", "videos", "video_ids", "meta")


# Issue 10's hostile bodies: a `"key": value` (raw JSON text) put into a valid body of each route.
HOSTILE_ITEMS = [
    (None, "nests deeper"),
    # true_cfg_scale: a field the served Qwen-Image reads (guidance_scale it would refuse as unread)
    (b'"guidance_scale": NaN', "NaN"),
    (b'"guidance_scale": 1e999', "overflows"),
    (b'"true_cfg_scale": "Infinity"', "finite"),
    (b'"true_cfg_scale": 1e308', "within"),
    (b'"true_cfg_scale": -1e308', "within"),
    (b'"negative_prompt": "a \\ud800 cat"', "lone surrogate"),
]
HOSTILE_IDS = ["deep", "NaN", "1e999", "Infinity-string", "1e308", "-1e308", "surrogate"]
_VALID = {
    "/v1/images/generations": b'{"prompt": "x", %s}',
    "/v1/videos": b'{"prompt": "x", %s}',
    "/v1/chat/completions": b'{"modalities": ["image"], "messages": [{"role": "user", "content": "x"}], %s}',
}


def hostile_body(path: str, item: bytes | None) -> bytes:
    """A body for `path` carrying `item`; None: a few thousand `[`."""
    return b"[" * 5000 if item is None else _VALID[path] % item
