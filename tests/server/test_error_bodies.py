"""`OpenAIErrorBodies` on its own (no engine): which bodies it rewrites and which it leaves alone.

The real servers are checked layer by layer in test_errors.py / test_bagel_server.py
(`assert_framework_errors_shaped`); here the edge cases: an OpenAI-shaped body passes
byte-for-byte, a 2xx stream is not buffered, JSON and plain-text errors of any producer
are rewritten with a correct content-length.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from vllm_omni_plugin.server.errors import OpenAIErrorBodies, error_body, openai_error_bytes

SHAPED = error_body(400, "bad size", "size")


async def _stream(_):
    async def chunks():
        for i in range(3):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/event-stream")


APP = OpenAIErrorBodies(Starlette(routes=[
    Route("/shaped", lambda _: JSONResponse(SHAPED, status_code=400)),
    Route("/detail", lambda _: JSONResponse({"detail": [{"loc": ["body"], "msg": "x"}]}, status_code=422)),
    Route("/unauthorized", lambda _: JSONResponse({"error": "Unauthorized"}, status_code=401)),
    Route("/plain", lambda _: PlainTextResponse("Content Too Large", status_code=413)),
    Route("/stream", _stream),
]))


def _get(path: str) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
            return await c.get(path)

    return asyncio.run(go())


def test_rewrites_every_non_openai_error_body():
    assert _get("/shaped").content == JSONResponse(SHAPED).body  # untouched
    for path, status, message in (("/unauthorized", 401, "Unauthorized"), ("/plain", 413, "Content Too Large"),
                                  ("/detail", 422, json.dumps([{"loc": ["body"], "msg": "x"}]))):
        r = _get(path)
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        assert r.json() == {"error": {"message": message, "type": error_body(status, "")["error"]["type"],
                                      "param": None, "code": status}}
    assert _get("/missing").json()["error"]["code"] == 404  # Starlette's own plain-text 404


def test_success_streams_pass_through():
    r = _get("/stream")
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_openai_error_bytes():
    assert openai_error_bytes(400, json.dumps(SHAPED).encode()) is None
    assert json.loads(openai_error_bytes(500, b"Internal Server Error"))["error"]["type"] == "InternalServerError"
    assert json.loads(openai_error_bytes(400, b""))["error"]["message"] == "Bad Request"


def test_head_error_has_no_body():
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
            return await c.head("/missing")

    r = asyncio.run(go())
    assert r.status_code in (404, 405) and r.content == b""
