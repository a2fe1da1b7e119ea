"""What every omni route shares: request ids, metrics + error mapping, JSON and form bodies,
the model check. (Running a request is the serving modules', server/serving/.)"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, QueueFull, RequestAborted
from ...request import RequestError, parse_json_object
from ...request.body import BodyTooLarge
from ..errors import REQUEST_ID_HEADER, OmniHTTPError, error_response, internal_error, to_http_error
from ..serving.common import ClientDisconnected, runtime

_OMNI_ERRORS = (OmniHTTPError, RequestError, QueueFull, EngineStopped, RequestAborted, GenerationFailed)


def omni_route(name: str) -> Callable:
    """Give the request its id, record per-route metrics and turn errors into OpenAI error bodies:
    omni errors keep their status; anything else raised (a `ValueError` from a pipeline included)
    is a 500 carrying the request id, logged with its traceback."""

    def wrap(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(handler)
        async def wrapped(request: Request, *args: Any, **kwargs: Any) -> Response:
            metrics = runtime(request).metrics
            rid = request.state.omni_request_id = f"{name.split('.')[0]}-{uuid.uuid4().hex}"
            started = time.monotonic()
            metrics.in_flight_route.labels(name).inc()
            try:
                response = await handler(request, *args, **kwargs)
            except _OMNI_ERRORS as exc:
                err = to_http_error(exc)
                if err.status >= 500 and isinstance(exc, GenerationFailed):
                    response = internal_error(exc, rid, name)
                else:
                    response = error_response(err.status, err.message, err.param)
            except HTTPException as exc:  # Starlette's own refusals (a multipart body it cannot parse)
                response = error_response(exc.status_code, str(exc.detail))
            except ClientDisconnected:
                response = Response(status_code=499)  # nginx's "client closed request"; never sent
            except Exception as exc:  # noqa: BLE001 -- not swallowed: logged with traceback, answered 500
                response = internal_error(exc, rid, name)
            finally:
                metrics.in_flight_route.labels(name).dec()
            response.headers.setdefault(REQUEST_ID_HEADER, rid)
            metrics.requests.labels(name, str(response.status_code)).inc()
            metrics.latency.labels(name).observe(time.monotonic() - started)
            return response

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


_FLAGS = {None: False, False: False, True: True, "false": False, "true": True}


def streaming_families() -> list[str]:
    """The families (pipelines' `family` names) that stream partial images: every declared
    pipeline whose capabilities say `partial_images`, read from the registry, not listed by hand."""
    from ...registry import pipeline_classes  # imports each family's pipeline module: on this error path only

    return sorted({cls.family for cls in pipeline_classes() if cls.capabilities.partial_images})


def check_request(request: Request, fields: dict[str, Any], *, streams: bool = False, partials: bool = True) -> bool:
    """Checks every generation route makes: the model name (or a LoRA adapter's) and `stream` (popped from `fields`).

    Args:
        request: the HTTP request.
        fields: the body's fields.
        streams: the route can answer with server-sent events (the image routes, chat).
        partials: what the route streams is partial images (the image routes): then
            `stream: true` is taken where the served model can stream them. Chat streams the
            finished images of any model, partial images (`partial_images`) where it can.

    Returns:
        whether the answer is to be streamed.
    """
    model = fields.get("model")
    check_model(request, model)
    if model is not None and model in runtime(request).adapters:
        # a `model` that names a LoRA adapter selects it at scale 1.0 (vLLM's convention), ahead of `lora`
        listed = fields.get("lora")
        if isinstance(listed, str):  # a form field: JSON text
            listed = _json_list(listed)
        if listed is None:
            listed = []
        if isinstance(listed, list) and not any(isinstance(x, dict) and x.get("name") == model for x in listed):
            fields["lora"] = [{"name": model, "scale": 1.0}, *listed]
    raw = fields.pop("stream", None)
    stream = _FLAGS.get(raw) if isinstance(raw, (bool, str, type(None))) else None
    if stream is None:
        raise RequestError(f"`stream` must be true or false, got {raw!r}", "stream")
    if stream and not streams:
        raise RequestError("streaming responses are not supported by the omni server on this route; omit `stream`",
                           "stream")
    if not stream:
        if fields.get("partial_images") not in (None, 0, "0"):
            raise RequestError("`partial_images` needs `stream: true` (partial images are streamed)", "partial_images")
        return False
    info = runtime(request).pipeline
    if not partials:
        if fields.get("partial_images") not in (None, 0, "0") and not info.capabilities.partial_images:
            raise RequestError(f"{info.family} cannot stream partial images (it declares no partial-image "
                               "decoder); its chat stream sends the finished images: omit `partial_images`",
                               "partial_images")
        return True
    if not info.capabilities.partial_images:
        raise RequestError(f"{info.family} cannot stream its answers (it declares no partial-image decoder; "
                           f"streaming: {', '.join(streaming_families())}); omit `stream`", "stream")
    if fields.get("response_format") == "url":
        raise RequestError("`stream: true` answers with b64_json images only; response_format=url is not "
                           "supported (this server keeps no image store)", "response_format")
    return True


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
    omni = runtime(request)
    names = [*omni.config.served_model_names, *omni.adapters]
    if model not in names:
        raise OmniHTTPError(404, f"The model `{model}` does not exist. This server serves: {', '.join(names)}", "model")


def _json_list(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text  # refused by the request layer, naming `lora`


def json_response(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status)
