"""Prometheus metrics of the omni routes and the diffusion engine (GET /metrics).

A registry of our own, registered as one collector into vLLM's Prometheus
registry, so vLLM's GET /metrics serves both (vLLM's engine and HTTP metrics,
and these) on either kind of server.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.client import EngineCoreClient
from ..orchestrator.engine_loop import EngineLoop

# (vLLM's registry, the omni registry registered in it): at most one per process
_exposed: tuple[CollectorRegistry, CollectorRegistry] | None = None

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class OmniMetrics:
    def __init__(self, bridge: EngineCoreClient | EngineLoop) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "omni_requests", "Omni requests by route and HTTP status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "omni_request_latency_seconds", "Omni request latency by route", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight_route = Gauge("omni_route_requests_in_flight", "Requests being served, by route", ["route"], registry=r)
        self.step_latency = Histogram(
            "omni_engine_step_seconds", "Wall time of one diffusion engine step (one batched denoise step)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.step_batch = Histogram(
            "omni_engine_step_requests", "Requests advanced by one engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        Gauge("omni_engine_requests_in_flight", "Requests in the diffusion engine (waiting + running)",
              registry=r).set_function(lambda: bridge.in_flight)
        Gauge("omni_engine_requests_running", "Requests the diffusion engine holds state for",
              registry=r).set_function(lambda: bridge.running)
        Gauge("omni_engine_queue_length", "Requests waiting for the diffusion engine to admit them",
              registry=r).set_function(lambda: max(bridge.in_flight - bridge.running, 0))
        Gauge("omni_engine_queue_capacity", "--omni-max-queue", registry=r).set_function(lambda: bridge.max_queue)
        # Multi-stage models (AR -> DiT): where an image request's time went, and the KV hand-over
        # (MultiStage feeds these through observe_stage_timings; they stay at zero on diffusion-only models)
        self.stage_seconds = Histogram(
            "omni_stage_seconds", "Wall time of one image request in a stage of a multi-stage model "
            "(ar_prefill, kv_handover, diffusion, decode -- part of diffusion --, total)", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.handover_seconds = Histogram(
            "omni_kv_handover_seconds", "Wall time of one request's KV hand-over from the AR stage to the DiT stage",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.handover_bytes = Counter(
            "omni_kv_handover_bytes", "Bytes of KV cache handed from the AR stage to the DiT stage", registry=r
        )
        for name in ("submitted", "finished", "failed", "aborted", "rejected"):
            Gauge(f"omni_engine_requests_{name}", f"Requests {name} since start", registry=r).set_function(
                (lambda n: lambda: getattr(bridge.stats, n))(name)
            )
        Gauge("omni_engine_alive", "1 while the diffusion engine serves; 0 while its process is dead or restarting",
              registry=r).set_function(lambda: float(bridge.alive))
        Gauge("omni_engine_restarts", "Times the diffusion engine process died and was started again",
              registry=r).set_function(lambda: getattr(bridge.stats, "restarts", 0))
        bridge.step_observer = self.observe_step

    def observe_step(self, seconds: float, requests: int) -> None:
        self.step_latency.observe(seconds)
        self.step_batch.observe(requests)

    def observe_stage_timings(self, timings: Any) -> None:
        """One finished image request of a multi-stage model (its orchestrator's `StageTimings`)."""
        for stage, seconds in (("ar_prefill", timings.ar_prefill), ("kv_handover", timings.transfer),
                               ("diffusion", timings.diffusion), ("decode", timings.decode), ("total", timings.total)):
            self.stage_seconds.labels(stage).observe(seconds)
        self.handover_seconds.observe(timings.transfer)
        self.handover_bytes.inc(timings.transferred_bytes)

    def expose_in_vllm_registry(self) -> None:
        """Serve these metrics on vLLM's /metrics (vLLM's process-wide registry). One runtime serves a
        process; a later one (tests that build several apps) takes the place of the earlier one."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        global _exposed
        target = get_prometheus_registry()
        if _exposed is not None:
            if _exposed[1] is self.registry:
                return
            _exposed[0].unregister(_exposed[1])
        target.register(self.registry)
        _exposed = (target, self.registry)
