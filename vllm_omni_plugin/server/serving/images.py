"""Images: the canonical request -> the engine -> `{created, data: [{b64_json}], ..., omni}`,
or, with `stream: true`, server-sent events: OpenAI's partial-image and completed events."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from ...diffusion.output import DiffusionOutput
from ...request.builder import CanonicalRequest
from ..encode import b64_images, encode_image
from .common import generate, request_id, resolved_json, runtime, streamed_error


def images_response(canon: CanonicalRequest, output: DiffusionOutput) -> dict[str, Any]:
    """The images answer around `output`, its `data` left for the caller (encoded off the event loop)."""
    p = canon.params
    return {
        "created": int(time.time()),
        "data": None,
        "output_format": canon.output.output_format,
        "size": f"{p.width}x{p.height}" if p.width and p.height else None,
        "background": "transparent" if output.kind == "layers" else "opaque",
        "omni": resolved_json(p, output.request_id, canon.ignored, output.dtypes),
    }


async def run_images(request: Request, canon: CanonicalRequest) -> dict[str, Any]:
    """Run `canon` (aborted if the client goes away) and return the images answer.

    Args:
        request: the HTTP request (its runtime, its id, its connection).
        canon: the validated, resolved request.

    Returns:
        the answer's JSON body.
    """
    output = await generate(request, canon.params)
    body = images_response(canon, output)
    encoded = await asyncio.to_thread(b64_images, output, canon.output)
    body["data"] = [{"b64_json": b64} for b64 in encoded]
    return body


async def serve_images(request: Request, fields: dict[str, Any], images: Sequence[Any] = (), *,
                       task: str) -> dict[str, Any]:
    """Build the request from the body's fields (off the event loop: images decode there), run it.

    Args:
        request: the HTTP request.
        fields: the body's generation fields (the route's own fields already taken out).
        images: the input images (bytes) of an edit.
        task: "image" or "edit".

    Returns:
        the answer's JSON body.
    """
    canon = await asyncio.to_thread(runtime(request).builder.build, fields, images, task=task)
    return await run_images(request, canon)


# ---- streaming (`stream: true`) ----------------------------------------------------------------
#: the event types of OpenAI's image streams, by task
_EVENT_PREFIX = {"image": "image_generation", "edit": "image_edit"}
#: `usage` of a completed event: this server does not meter tokens (OpenAI's field is required)
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def stream_images(request: Request, fields: dict[str, Any], images: Sequence[Any] = (), *,
                        task: str) -> StreamingResponse:
    """Run the request and answer with `text/event-stream`.

    Events, in order: for each partial image k (0..partial_images-1, `partial_steps`) one
    `<prefix>.partial_image` per output image (`index` 0..n-1), then one `<prefix>.completed`
    per output image, with the answer's `omni` block; prefix `image_generation` or `image_edit`
    (OpenAI's names and fields).
    A failure after the stream started is one `data: {"error": ...}` event (the openai client
    raises it); a bad request or a full queue is a plain JSON error before any event. A client
    that closes the connection aborts the request (at the engine's next step).

    Args:
        request: the HTTP request.
        fields: the body's generation fields (`stream` already taken out).
        images: the input images (bytes) of an edit.
        task: "image" or "edit".
    """
    omni = runtime(request)
    canon = await asyncio.to_thread(omni.builder.build, fields, images, task=task)
    queue: asyncio.Queue = asyncio.Queue()
    work = asyncio.ensure_future(omni.stages.generate_image(
        canon.params, None, request_id=request_id(request),
        on_partial=lambda index, imgs: queue.put_nowait((index, imgs))))
    work.add_done_callback(lambda _: queue.put_nowait(None))
    await asyncio.sleep(0)  # the work runs up to its submission: a refusal (QueueFull) is a JSON error
    if work.done() and work.exception() is not None:
        raise work.exception()
    return StreamingResponse(_events(canon, work, queue, omni.pipeline.capabilities.background, request_id(request)),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(canon: CanonicalRequest, work: asyncio.Future, queue: asyncio.Queue, background: str,
                  rid: str) -> AsyncIterator[bytes]:
    prefix = _EVENT_PREFIX[canon.task]
    p, spec = canon.params, canon.output

    def common(b64: str, index: int) -> dict[str, Any]:
        return {"b64_json": b64, "index": index, "created_at": int(time.time()), "size": f"{p.width}x{p.height}",
                "output_format": spec.output_format, "background": background, "quality": "auto"}

    def encoded(imgs: list[Any]) -> list[str]:
        return [base64.b64encode(encode_image(img, spec)).decode("ascii") for img in imgs]

    try:
        while (item := await queue.get()) is not None:
            index, imgs = item
            for row, b64 in enumerate(await asyncio.to_thread(encoded, imgs)):
                yield _sse({"type": f"{prefix}.partial_image", **common(b64, row), "partial_image_index": index})
        try:
            output = work.result()
        except Exception as exc:  # noqa: BLE001 -- the stream is open: the error is its last event
            yield f"data: {json.dumps(streamed_error(exc, rid, 'image'))}\n\n".encode()
            return
        # `omni` (an extension field, as on the non-streamed answer): what ran, defaults filled in
        omni = resolved_json(p, output.request_id, canon.ignored)
        for row, b64 in enumerate(await asyncio.to_thread(b64_images, output, spec)):
            yield _sse({"type": f"{prefix}.completed", **common(b64, row), "usage": _NO_USAGE, "omni": omni})
    finally:
        if not work.done():
            work.cancel()  # the client went away: the runtime aborts the request at the next step
