"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}`.

The same body shape vLLM's own routes return (code = the HTTP status), so one
client-side handler fits both. Bad input is 4xx with a message saying what to
change; only a failure of the server itself is 5xx.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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
    if isinstance(exc, GenerationFailed):
        # The pipeline rejected the input while preparing it (e.g. a model-specific
        # rule) -> the client's to fix; anything else is ours.
        if isinstance(exc.__cause__, (ValueError, TypeError)):
            return OmniHTTPError(400, str(exc))
        return OmniHTTPError(500, str(exc))
    raise TypeError(f"not an omni error: {type(exc).__name__}") from exc


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        err = to_http_error(exc)
        return error_response(err.status, err.message, err.param)

    for cls in (OmniHTTPError, RequestError, QueueFull, EngineStopped, RequestAborted, GenerationFailed):
        app.add_exception_handler(cls, handle)
