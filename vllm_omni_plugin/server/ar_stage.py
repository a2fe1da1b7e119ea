"""`vllm serve MODEL --omni --omni-stage ar`: what the omni plugin adds to vLLM's server of the AR stage alone.

vLLM's routes answer everything (text as in plain `vllm serve`; a DiT server's hand-overs
are /v1/completions requests with kv_transfer_params, or, where the AR's generated tokens are
the hand-over, vLLM's /inference/v1/generate, on with `--enable-scale-out`). Added here:

* GET /omni/stage: what this server is (`{"stage": "ar", "model", "served_model_name",
  "fingerprint", "dtype", "max_model_len"}`), which a DiT server checks before its first request
  (orchestrator/remote.py);
* POST /v1/omni/prefill: an AR prompt with image inputs (img2img), which vLLM's
  /v1/completions cannot carry (orchestrator/ar_wire.py): the prompt dict goes to vLLM's
  engine client as the colocated hand-over gives it, vLLM's multimodal processor runs on
  its images; the reply holds the request output's kv_transfer_params. Counted in vLLM's
  /load like vLLM's own routes; guarded by --api-key like them;
* on /metrics, the NIXL producer's leases (`omni_kv_published_total`,
  `omni_kv_freed_total{reason="acked"|"expired"}`, `omni_kv_held`), read from the
  file the engine process's connector keeps (kv/nixl.py: LEASE_STATS).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.utils.api_utils import load_aware_call

from ..kv.nixl import LEASE_STATS
from ..orchestrator.ar_wire import PREFILL_ROUTE, decode_prompt
from ..orchestrator.remote import STAGE_ROUTE, checkpoint_fingerprint
from .errors import error_response

router = APIRouter()


@router.get(STAGE_ROUTE)
async def stage_info(request: Request) -> dict[str, Any]:
    info = dict(request.app.state.omni_ar_stage)
    # the dtype vLLM resolved for the AR model ("auto" on the command line becomes one here):
    # a DiT server reports it as its AR stage's dtype
    vllm_config = getattr(request.app.state, "vllm_config", None)
    if vllm_config is not None:
        info["dtype"] = str(vllm_config.model_config.dtype).removeprefix("torch.")
        info["max_model_len"] = vllm_config.model_config.max_model_len  # what a DiT server checks sizes against
    return info


@router.post(PREFILL_ROUTE)
@load_aware_call
async def prefill(raw_request: Request) -> JSONResponse:
    """One hand-over's AR prefill of a prompt with image inputs (ar_wire.py has the body)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        body = await raw_request.json()
        prompt = decode_prompt(body)
        sampling = body.get("sampling") or {}
        params = VllmSamplingParams(max_tokens=int(sampling.get("max_tokens") or 1),
                                    temperature=float(sampling.get("temperature") or 0.0),
                                    extra_args={"kv_transfer_params": sampling.get("kv_transfer_params")})
        request_id = str(body["request_id"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return error_response(400, f"not an AR prefill body ({type(e).__name__}: {e})")
    final = None
    try:
        async for out in raw_request.app.state.engine_client.generate(prompt, params, request_id):
            final = out
    except EngineDeadError as e:
        return error_response(503, f"the AR stage's engine died while running request {request_id}: {e}")
    except ValueError as e:  # vLLM's input checks (modality limits, lengths, the processor's rules)
        return error_response(400, str(e))
    return JSONResponse({"request_id": request_id, "kv_transfer_params": final.kv_transfer_params})


class _LeaseCollector:
    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = json.loads(self.path.read_text())
        except (OSError, ValueError):
            stats = {}
        published = CounterMetricFamily("omni_kv_published", "KV contexts published over NIXL for DiT servers")
        published.add_metric([], stats.get("published", 0))
        freed = CounterMetricFamily("omni_kv_freed", "Published KV contexts freed: acked by the DiT server's "
                                    "pull, or expired (the lease ended first)", labels=["reason"])
        for reason in ("acked", "expired"):
            freed.add_metric([reason], stats.get(reason, 0))
        held = GaugeMetricFamily("omni_kv_held", "Published KV contexts waiting for their pull")
        held.add_metric([], stats.get("held", 0))
        return [published, freed, held]


_collector: Any = None


def attach(app: FastAPI, args: argparse.Namespace, model: str) -> None:
    """Add the AR stage's route and lease metrics to vLLM's app (`args`: the serve args launch.py set)."""
    global _collector
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    names = list(getattr(args, "served_model_name", None) or [args.model])
    app.state.omni_ar_stage = {"stage": "ar", "model": model, "served_model_name": names[0],
                               "fingerprint": checkpoint_fingerprint(args.model)}
    app.include_router(router)
    kv = getattr(args, "kv_transfer_config", None) or {}
    extra = (kv.get("kv_connector_extra_config") if isinstance(kv, dict) else kv.kv_connector_extra_config) or {}
    if extra.get("transfer_dir") and _collector is None:
        _collector = _LeaseCollector(Path(extra["transfer_dir"]) / LEASE_STATS)
        get_prometheus_registry().register(_collector)
