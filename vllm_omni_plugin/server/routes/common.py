"""What every omni route shares: state access, metrics + error mapping,
JSON bodies, the model check, and running a request with disconnect-abort."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ...diffusion.output import DiffusionOutput
from ...diffusion.params import ResolvedParams
from ...request import RequestError, parse_json_object
from ...request.body import BodyTooLarge
from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, ProgressFn, QueueFull, RequestAborted
from ..errors import OmniHTTPError, error_response, to_http_error

T = TypeVar("T")

_OMNI_ERRORS = (OmniHTTPError, RequestError, QueueFull, EngineStopped, RequestAborted, GenerationFailed)


class ClientDisconnected(Exception):
    """The client went away; its work was aborted. Nobody reads the response."""


def runtime(request: Request):
    return request.app.state.omni


def omni_route(name: str) -> Callable:
    """Record per-route metrics and turn omni errors into OpenAI error bodies."""

    def wrap(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(handler)
        async def wrapped(request: Request, *args: Any, **kwargs: Any) -> Response:
            metrics = runtime(request).metrics
            started = time.monotonic()
            metrics.in_flight_route.labels(name).inc()
            status = 500
            try:
                response = await handler(request, *args, **kwargs)
                status = response.status_code
                return response
            except _OMNI_ERRORS as exc:
                err = to_http_error(exc)
                status = err.status
                return error_response(err.status, err.message, err.param)
            except ClientDisconnected:
                status = 499  # nginx's "client closed request"; never sent
                return Response(status_code=499)
            finally:
                metrics.in_flight_route.labels(name).dec()
                metrics.requests.labels(name, str(status)).inc()
                metrics.latency.labels(name).observe(time.monotonic() - started)

        return wrapped

    return wrap


async def json_body(request: Request) -> dict[str, Any]:
    """The JSON object of the body, checked by the request layer (size, depth, finite numbers, Unicode)."""
    limits = runtime(request).config.limits
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BodyTooLarge(limits.max_body_bytes)  # before reading it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise BodyTooLarge(limits.max_body_bytes)
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks), limits)


def check_request(request: Request, fields: dict[str, Any]) -> None:
    """Checks every generation route makes: the model name, and no streaming (pops `stream`)."""
    check_model(request, fields.get("model"))
    if fields.pop("stream", None) not in (None, False, "false"):
        raise RequestError("streaming responses are not supported by the omni server; omit `stream`", "stream")


async def read_form(
    request: Request,
    image_files: tuple[str, ...],
    image_urls: tuple[str, ...] = (),
    refused: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """(fields, images) of a multipart / urlencoded body.

    image_files: keys whose values are uploaded image files (raw bytes kept);
    image_urls: keys whose values are image URLs (fetched under vLLM's media rules);
    refused: key -> message for fields this server rejects (e.g. `mask`).
    """
    from starlette.datastructures import UploadFile

    refused = refused or {}
    form = await request.form()
    fields: dict[str, Any] = {}
    images: list[Any] = []
    for key, value in form.multi_items():
        if key in refused:
            raise RequestError(refused[key], key)
        if key in image_files:
            if not isinstance(value, UploadFile):
                raise RequestError(f"`{key}` must be an uploaded image file", key)
            images.append(await _read_upload(value, key, runtime(request).config.limits.max_input_bytes))
        elif key in image_urls:
            images.append(await runtime(request).media.fetch_image(value, key))
        elif isinstance(value, UploadFile):
            raise RequestError(f"unexpected file field `{key}`", key)
        elif key in fields:
            raise RequestError(f"field `{key}` given more than once", key)
        else:
            fields[key] = value
    return fields, images


async def _read_upload(upload: Any, key: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise RequestError(f"`{key}` is larger than this server's limit of {max_bytes} bytes", key)
    return await upload.read()


def check_model(request: Request, model: Any) -> None:
    """`model` may be omitted; when given it must be a name this server serves."""
    if model is None:
        return
    names = runtime(request).config.served_model_names
    if model not in names:
        raise OmniHTTPError(404, f"The model `{model}` does not exist. This server serves: {', '.join(names)}", "model")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (each runtime turns the
    cancellation into an abort of its engine work) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def generate(request: Request, params: ResolvedParams, on_progress: ProgressFn | None = None) -> DiffusionOutput:
    """Run one image request (diffusion engine, or AR -> DiT); abort it if the client disconnects first."""
    return await until_disconnect(request, runtime(request).stages.generate_image(params, on_progress))


def json_response(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status)


def resolved_json(params: ResolvedParams, request_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resolved": params.public_dict()}
    if request_id is not None:
        out["request_id"] = request_id
    return out
