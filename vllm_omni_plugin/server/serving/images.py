"""Images: the canonical request -> the engine -> `{created, data: [{b64_json}], ..., omni}`."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from fastapi import Request

from ...diffusion.output import DiffusionOutput
from ...request.builder import CanonicalRequest
from ..encode import b64_images
from .common import generate, resolved_json, runtime


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
