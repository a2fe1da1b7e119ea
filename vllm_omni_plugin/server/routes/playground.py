"""GET /omni/playground: a browser page to try the served model (static HTML + JS, no build step).

The page is three files shipped in the package (server/playground-page/) and a config it reads
from GET /omni/playground/config.json: the served model names and what the model declares about
itself (output kind, honoured fields, input images -- `Capabilities.as_json`) plus the server's
request limits. The page shows a form field for each honoured field, so a model's form never offers
a knob it would refuse. Everything it generates goes through the public routes (/v1/images/...,
/v1/videos) with the API key typed into the page, exactly as any client would.

The page and its config are outside vLLM's --api-key guard (which covers /v1 only): they carry
nothing but what the model card says; every generation request still needs the key.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import error_response
from .common import json_response, runtime

router = APIRouter()

_STATIC = files("vllm_omni_plugin.server") / "playground-page"
# The files the page is made of, by URL name (a fixed table: no path from the URL reaches the disk).
_FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}


def _static(name: str) -> Response:
    return Response(_STATIC.joinpath(name).read_bytes(), media_type=_FILES[name],
                    headers={"Cache-Control": "no-cache"})


@router.get("/omni/playground")
async def playground_page():
    return _static("index.html")


@router.get("/omni/playground/config.json")
async def playground_config(request: Request):
    omni = runtime(request)
    lim = omni.config.limits
    return json_response({
        "model": omni.model_name,
        "models": list(omni.config.served_model_names),
        "family": omni.pipeline.family,
        "output": omni.builder.output_kind,
        "capabilities": omni.pipeline.capabilities.as_json(),
        "limits": {"max_pixels": lim.max_pixels, "max_steps": lim.max_steps, "max_n": lim.max_n,
                   "max_frames": lim.max_frames, "max_input_images": lim.max_input_images},
    })


@router.get("/omni/playground/{name}")
async def playground_file(name: str):
    if name not in _FILES:
        return error_response(404, f"no playground file {name!r}", "name")
    return _static(name)
