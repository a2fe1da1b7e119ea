"""GET /health (both apps); GET /v1/models and GET /load on the diffusion-only app (vLLM's own
where vLLM serves the model).

/metrics is vLLM's route on vLLM's registry, which the omni metrics join
(`OmniMetrics.expose_in_vllm_registry`).
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from ...diffusion.lora import LoraBusy, LoraError, LoraNotFound
from ...request import RequestError
from ..errors import error_response
from .common import json_body, json_response, omni_route, runtime

router = APIRouter()
models_router = APIRouter()
#: POST /v1/load_lora_adapter and /v1/unload_lora_adapter: only with VLLM_ALLOW_RUNTIME_LORA_UPDATING set
lora_router = APIRouter()


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
    # LoRA adapters as vLLM lists its LoRA modules: the adapter's path as root, the base model as parent
    data += [{"id": name, "object": "model", "created": omni.created, "owned_by": "vllm-omni-plugin",
              "root": path, "parent": omni.model_name} for name, path in omni.adapters.items()]
    return json_response({"object": "list", "data": data})


def runtime_lora_updating() -> bool:
    """vLLM's switch for its load / unload routes (they exist only with it set)."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


async def _lora_body(request: Request, *keys: str) -> list[str]:
    body = await json_body(request)
    out = []
    for key in keys:
        value = body.get(key)
        if not isinstance(value, str) or not value:
            raise RequestError(f"`{key}` is required (a non-empty string)", key)
        out.append(value)
    return out


def _lora_error(exc: LoraError) -> Response:
    status = 404 if isinstance(exc, LoraNotFound) else 409 if isinstance(exc, LoraBusy) else 400
    return error_response(status, str(exc), exc.field)


@lora_router.post("/v1/load_lora_adapter")
@omni_route("lora.load")
async def load_lora_adapter(request: Request):
    """vLLM's body {"lora_name", "lora_path"}: read the adapter (under --omni-lora-dirs) into the engine."""
    omni = runtime(request)
    name, path = await _lora_body(request, "lora_name", "lora_path")
    if name in omni.config.served_model_names:
        raise RequestError(f"{name!r} is the served model's name; pick another adapter name", "lora_name")
    try:
        info = await omni.lora_call("load_lora", name, path)
    except LoraError as exc:
        return _lora_error(exc)
    omni.adapters[name] = info["path"]
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@lora_router.post("/v1/unload_lora_adapter")
@omni_route("lora.unload")
async def unload_lora_adapter(request: Request):
    """vLLM's body {"lora_name"}; an adapter a queued or running request uses is not unloaded (409)."""
    omni = runtime(request)
    (name,) = await _lora_body(request, "lora_name")
    try:
        await omni.lora_call("unload_lora", name)
    except LoraError as exc:
        return _lora_error(exc)
    omni.adapters.pop(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


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
