"""POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart or JSON)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from ...diffusion.output import DiffusionOutput
from ...request import RequestError
from ...request.builder import CanonicalRequest
from ...request.protocol import request_body
from ..encode import b64_images
from .common import check_request, generate, json_body, json_response, omni_route, read_form, resolved_json, runtime

router = APIRouter()

_NO_MASK = "`mask` is not supported: the served model edits from the instruction"


def images_response(canon: CanonicalRequest, output: DiffusionOutput) -> dict[str, Any]:
    p = canon.params
    return {
        "created": int(time.time()),
        "data": None,  # filled by the caller (encoding runs off the event loop)
        "output_format": canon.output.output_format,
        "size": f"{p.width}x{p.height}" if p.width and p.height else None,
        "background": "transparent" if output.kind == "layers" else "opaque",
        "omni": resolved_json(p, output.request_id, canon.ignored),
    }


async def run_images(request: Request, canon: CanonicalRequest) -> dict[str, Any]:
    output = await generate(request, canon.params)
    body = images_response(canon, output)
    encoded = await asyncio.to_thread(b64_images, output, canon.output)
    body["data"] = [{"b64_json": b64} for b64 in encoded]
    return body


@router.post("/v1/images/generations", openapi_extra={"requestBody": request_body("/v1/images/generations")})
@omni_route("images.generations")
async def create_image(request: Request):
    body = await json_body(request)
    check_request(request, body)
    canon = await asyncio.to_thread(runtime(request).builder.build, body, task="image")
    return json_response(await run_images(request, canon))


async def _edit_inputs(request: Request) -> tuple[dict[str, Any], list[Any]]:
    """(fields, images) of an edit request: multipart (OpenAI's upload form) or JSON with image URLs."""
    omni = runtime(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await json_body(request)
        refs = body.pop("images", None) or []
        if not isinstance(refs, list) or not all(isinstance(r, dict) and "image_url" in r for r in refs):
            raise RequestError('`images` must be a list of {"image_url": URL} objects', "images")
        images = [await omni.media.fetch_image(r["image_url"], "images") for r in refs]
        if "mask" in body:
            raise RequestError(_NO_MASK, "mask")
        return body, images
    return await read_form(request, ("image", "image[]"), refused={"mask": _NO_MASK})


@router.post("/v1/images/edits", openapi_extra={"requestBody": request_body("/v1/images/edits")})
@omni_route("images.edits")
async def edit_image(request: Request):
    fields, images = await _edit_inputs(request)
    check_request(request, fields)
    canon = await asyncio.to_thread(runtime(request).builder.build, fields, images, task="edit")
    return json_response(await run_images(request, canon))
