"""GET /v1/models, /health, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import error_response
from .common import json_response, runtime

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    omni = runtime(request)
    data = [
        {
            "id": name,
            "object": "model",
            "created": omni.created,
            "owned_by": "vllm-omni-plugin",
            "root": omni.config.model,
            "parent": None,
            "omni": {
                "family": omni.pipeline.family,
                "output": omni.builder.output_kind,
                "text_output": omni.stages.text,  # chat answers in text (AR stage) unless images are asked for
            },
        }
        for name in omni.config.served_model_names
    ]
    return json_response({"object": "list", "data": data})


@router.get("/health")
async def health(request: Request):
    problem = runtime(request).stages.health()
    if problem is None:
        return Response(status_code=200)
    return error_response(503, problem)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(runtime(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
