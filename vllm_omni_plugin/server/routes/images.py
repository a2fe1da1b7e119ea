"""POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart or JSON): the routes.

Bodies: request/protocol.py (`ImageGenerationRequest`, `ImageEditForm`, `ImageEditRequest`);
what runs them: server/serving/images.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ...request import RequestError
from ...request.protocol import request_body
from ..serving.common import runtime
from ..serving.images import serve_images, stream_images
from .common import check_request, json_body, json_response, omni_route, read_form

router = APIRouter()

_NO_MASK = "`mask` is not supported: the served model edits from the instruction"


@router.post("/v1/images/generations", openapi_extra={"requestBody": request_body("/v1/images/generations")})
@omni_route("images.generations")
async def create_image(request: Request):
    body = await json_body(request)
    if check_request(request, body, streams=True):
        return await stream_images(request, body, task="image")
    return json_response(await serve_images(request, body, task="image"))


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
    if check_request(request, fields, streams=True):
        return await stream_images(request, fields, images, task="edit")
    return json_response(await serve_images(request, fields, images, task="edit"))
