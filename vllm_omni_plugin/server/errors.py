"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}`.

The same body shape vLLM's own routes return (code = the HTTP status), so one
client-side handler fits both. Bad input is 4xx with a message saying what to
change; only a failure of the server itself is 5xx: an error raised inside a
pipeline (a `ValueError` included) is a 500 whose message carries the request
id, logged with its traceback under that id.

`OpenAIErrorBodies` wraps the whole app (outside vLLM's middleware) and puts
every other error body in the same shape: vLLM's `--api-key` 401
(`{"error": "Unauthorized"}`), FastAPI/Starlette's `{"detail": ...}` (404, 405,
422, multipart parse errors), plain-text bodies (413 of a body limit, 500).
What uvicorn itself answers before the app sees a request (a malformed HTTP
request line, oversized headers) never reaches an ASGI app and keeps
uvicorn's plain-text body.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..diffusion.lora import LoraBusy, LoraError
from ..request import RequestError
from ..orchestrator.engine_loop import EngineStopped, GenerationFailed, QueueFull, RequestAborted

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OmniHTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def to_http_error(exc: BaseException) -> OmniHTTPError:
    """Map what the request builder and the engine loop raise to an HTTP error."""
    if isinstance(exc, OmniHTTPError):
        return exc
    if isinstance(exc, RequestError):
        return OmniHTTPError(exc.status, exc.message, exc.param)
    if isinstance(exc, QueueFull):
        return OmniHTTPError(503, str(exc))
    if isinstance(exc, EngineStopped):
        return OmniHTTPError(503, str(exc))
    if isinstance(exc, RequestAborted):
        return OmniHTTPError(409, str(exc))
    if isinstance(exc, GenerationFailed) and isinstance(exc.__cause__, LoraError):
        # an adapter the engine could not pin when the request was queued (all slots busy, or its file
        # no longer passes the rules on reload): the caller's to retry or fix, not a server failure
        cause = exc.__cause__
        return OmniHTTPError(503 if isinstance(cause, LoraBusy) else 400, str(cause), cause.field)
    if isinstance(exc, GenerationFailed):
        # Validation happened before the request was queued; whatever the pipeline
        # raises afterwards (ValueError included) is the server's failure.
        return OmniHTTPError(500, str(exc))
    raise TypeError(f"not an omni error: {type(exc).__name__}") from exc


logger = logging.getLogger("vllm.omni_plugin.server")

#: the header that carries the request id of every omni response (vLLM's name for it)
REQUEST_ID_HEADER = "X-Request-Id"


def internal_error(exc: BaseException, request_id: str, route: str) -> JSONResponse:
    """A 500 for an unexpected failure: logged with its traceback, the request id in body and header.

    Args:
        exc: what was raised (its traceback is logged).
        request_id: the id the client can quote; also the `X-Request-Id` header.
        route: the route's metric name, for the log line.

    Returns:
        the OpenAI-shaped 500 response.
    """
    logger.error("omni: %s request %s failed", route, request_id, exc_info=exc)
    cause = exc.__cause__ if isinstance(exc, GenerationFailed) and exc.__cause__ is not None else exc
    message = f"internal error ({type(cause).__name__}: {cause}); request id {request_id}"
    response = error_response(500, message)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        err = to_http_error(exc)
        return error_response(err.status, err.message, err.param)

    for cls in (OmniHTTPError, RequestError, QueueFull, EngineStopped, RequestAborted, GenerationFailed):
        app.add_exception_handler(cls, handle)


def _is_openai_shaped(body: object) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "code" in error


def _message_of(raw: bytes, status: int) -> str:
    """The human part of a non-OpenAI error body: `detail` / `error` / the text itself."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = raw.decode("utf-8", "replace").strip()
        return text or HTTPStatus(status).phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            value = body.get(key)
            if isinstance(value, str):
                return value
            if value is not None:
                return json.dumps(value)
    return json.dumps(body)


def openai_error_bytes(status: int, raw: bytes) -> bytes | None:
    """The OpenAI-shaped form of an error body, or None when it has that shape already."""
    try:
        if _is_openai_shaped(json.loads(raw)):
            return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return json.dumps(error_body(status, _message_of(raw, status))).encode()


class OpenAIErrorBodies:
    """ASGI middleware: every response with status >= 400 leaves in the OpenAI error shape.

    Installed outermost (`wrap_app_errors`), so it also sees what vLLM's
    authentication middleware and Starlette's error middleware answer. Only
    error responses are buffered (they are small); streams of 2xx pass through.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":  # HEAD answers carry no body
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def reshape(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            raw = b"".join(chunks)
            shaped = openai_error_bytes(start["status"], raw)
            headers = list(start.get("headers", []))
            if shaped is not None:
                raw = shaped
                headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": raw, "more_body": False})

        await self.app(scope, receive, reshape)


def wrap_app_errors(app: FastAPI) -> None:
    """Make `OpenAIErrorBodies` the outermost layer of `app` (outside the middleware vLLM adds
    after the endpoint plugins are attached, and outside Starlette's ServerErrorMiddleware).

    FastAPI builds its middleware stack on the first request; wrapping the builder is the one
    place that sees the final stack without depending on the order vLLM adds middleware in.
    """
    if getattr(app.state, "omni_error_bodies", False):
        return
    app.state.omni_error_bodies = True
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: OpenAIErrorBodies(build())  # type: ignore[method-assign]
