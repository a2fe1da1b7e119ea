"""GET /health (both apps); GET /v1/models and GET /load on the diffusion-only app (vLLM's own
where vLLM serves the model).

/metrics is vLLM's route on vLLM's registry, which the omni metrics join
(`OmniMetrics.expose_in_vllm_registry`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import error_response
from .common import json_response, runtime

router = APIRouter()
models_router = APIRouter()


@models_router.get("/v1/models")
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
                "capabilities": omni.pipeline.capabilities.as_json(),
                "dtype": omni.pipeline.dtype,  # its loaded weights' (a video job's answers carry none)
            },
        }
        for name in omni.config.served_model_names
    ]
    return json_response({"object": "list", "data": data})


@router.get("/health")
async def health(request: Request):
    """200 while every stage runs (the diffusion engine thread; a multi-stage model's AR engine too);
    otherwise 503 with an OpenAI error body saying which stage is down."""
    problem = runtime(request).stages.health()
    if problem is None:
        return Response(status_code=200)
    return error_response(503, problem)


@models_router.get("/load")
async def load(request: Request):
    """vLLM's `/load` body, `{"server_load": n}`, read by load-aware routers (vllm-router's
    power_of_two). vLLM counts the HTTP requests in flight on its generation routes; here n is
    the requests in the diffusion engine (waiting + running), which also counts video jobs
    whose POST has long been answered -- the work a replica really has."""
    return json_response({"server_load": runtime(request).bridge.in_flight})
