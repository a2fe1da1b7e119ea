"""The omni runtime and the app of diffusion-only checkpoints.

One set of routes, two kinds of runtime behind them:

* diffusion-only checkpoints: `InlineDiffusion`, one diffusion engine in its own
  process behind `EngineCoreClient` (engine/client.py: a crash there is a 503 for
  its requests and a restart, never a dead server), served by `build_app`: an app made of
  vLLM's own pieces (its exception handlers, its middleware -- CORS,
  --api-key, request ids, --middleware --, its Prometheus registry and
  /metrics) with the omni routes attached by the same `OmniEndpointPlugin`
  vLLM's server loads;
* multi-stage checkpoints (BAGEL): `MultiStage`, the `BagelOrchestrator`
  around the AR engine client that vLLM's own API server created (see
  server/plugin.py): vLLM answers text, the orchestrator images (AR -> DiT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vllm.exceptions import VLLMClientError

from ..diffusion.engine import EngineConfig
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams
from ..engine.client import EngineCoreClient
from ..engine.handles import PartialFn
from ..engine.spec import EngineSpec, PipelineInfo
from ..orchestrator.engine_loop import EngineLoop, ProgressFn, QueueFull
from ..orchestrator.stages import StageTimings
from ..request import RequestBuilder, RequestError
from .config import OmniServerConfig
from .errors import OmniHTTPError
from .media import MediaFetcher
from .job_store import HEARTBEAT_S, JobStore
from .metrics import OmniMetrics

logger = logging.getLogger("vllm.omni_plugin.server")


class InlineDiffusion:
    """A single-stage diffusion model behind its engine client: `EngineCoreClient` (the engine
    in its own process; what the server runs) or `EngineLoop` (the engine on a thread of this
    process; `OmniRuntime.load(..., engine_process=False)`, for benchmarks of the difference
    and tests that reach into the pipeline)."""

    text = False  # no text output

    def __init__(self, bridge: EngineCoreClient | EngineLoop) -> None:
        self.bridge = bridge

    @property
    def alive(self) -> bool:
        return self.bridge.alive

    def health(self) -> str | None:
        """None while serving; otherwise what is down (the /health answer)."""
        if isinstance(self.bridge, EngineCoreClient):
            return self.bridge.health()
        return None if self.bridge.alive else "the diffusion engine is not running"

    async def start(self) -> None:
        if isinstance(self.bridge, EngineLoop):  # (an engine process started when it was loaded)
            self.bridge.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.bridge.stop)
        if isinstance(self.bridge, EngineLoop):
            self.bridge.engine.close()  # a multi-GPU DiT's worker ranks (after the engine thread ended)

    async def generate_image(self, params: ResolvedParams, on_progress: ProgressFn | None = None,
                             request_id: str | None = None, on_partial: PartialFn | None = None) -> DiffusionOutput:
        """Run one request; `on_partial(index, images)` gets its partial images (on this event loop)."""
        handle = self.bridge.submit(params, on_progress, request_id=request_id, on_partial=on_partial)
        try:
            return await self.bridge.result(handle)
        except asyncio.CancelledError:
            self.bridge.abort(handle.request_id)  # the caller went away: stop at the next step
            raise


class MultiStage:
    """A multi-stage model (BAGEL) through its orchestrator, on the server's event loop.

    Image requests count against --omni-max-queue from the moment they are
    admitted (before the AR prefill), so the limit bounds the whole pipeline;
    text requests never come here: vLLM's own handlers answer them on the same
    AR engine client, queued by vLLM's scheduler as in plain `vllm serve`.
    """

    def __init__(self, orchestrator: Any, max_queue: int) -> None:
        self.orchestrator = orchestrator
        #: whether chat answers in text unless images are asked for (the family's declaration)
        self.text = orchestrator.info.capabilities.text_output
        #: the DiT stage's engine client (its own process, or a thread here with --omni-engine thread)
        self.bridge: EngineCoreClient | EngineLoop = orchestrator.client
        self.max_queue = max_queue
        self.images_in_flight = 0
        #: called with each finished image request's StageTimings (the omni metrics)
        self.timings_observer: Callable[[Any], None] | None = None

    @property
    def alive(self) -> bool:
        return self.health() is None

    def health(self) -> str | None:
        """None while both stages serve; otherwise which is down and whether it is being restarted."""
        return self.orchestrator.health()

    async def start(self) -> None:
        self.orchestrator.start()  # (attached to vLLM's engine client: started then)

    async def stop(self) -> None:
        await self.orchestrator.shutdown()  # the AR engine is vLLM's to stop

    async def generate_image(self, params: ResolvedParams, on_progress: ProgressFn | None = None,
                             request_id: str | None = None, on_partial: PartialFn | None = None) -> DiffusionOutput:
        """Run one request through both stages; `on_partial(index, images)` gets the DiT stage's
        partial images (on this event loop)."""
        if self.images_in_flight >= self.max_queue:
            self.bridge.stats.rejected += 1
            raise QueueFull(
                f"the server is at capacity ({self.images_in_flight} image requests in the pipeline, "
                f"--omni-max-queue {self.max_queue}); retry later"
            )
        self.images_in_flight += 1
        timings = StageTimings()
        try:
            output = await self.orchestrator.generate_image(
                params, on_progress, request_id=request_id or self.orchestrator.new_id("omni"), timings=timings,
                on_partial=on_partial)
            if self.timings_observer is not None:
                self.timings_observer(timings)
            return output
        except VLLMClientError as e:  # the AR stage refused it (e.g. prompt longer than max_model_len)
            raise RequestError(str(e), getattr(e, "parameter", None)) from e
        finally:
            self.images_in_flight -= 1


@dataclass
class OmniRuntime:
    """Everything the omni routes use; lives on `app.state.omni`."""

    config: OmniServerConfig
    #: the served model's family and declaration (the model itself may live in the engine process)
    pipeline: PipelineInfo
    builder: RequestBuilder
    stages: InlineDiffusion | MultiStage
    metrics: OmniMetrics
    media: MediaFetcher
    videos: JobStore
    created: int = field(default_factory=lambda: int(time.time()))
    #: LoRA adapter name -> path, as loaded in the engine (start flags, then the load / unload routes)
    adapters: dict[str, str] = field(default_factory=dict)
    _janitor: asyncio.Task | None = None
    _stopped: bool = False

    @property
    def bridge(self) -> EngineCoreClient | EngineLoop:
        """The diffusion engine's client (the final stage's, for a multi-stage model)."""
        return self.stages.bridge

    @classmethod
    def load(cls, config: OmniServerConfig, *, engine_process: bool | None = None) -> "OmniRuntime":
        """A diffusion-only runtime (blocking: starts the engine process and waits until it has loaded).

        Args:
            config: the server's omni configuration.
            engine_process: False runs the engine on a thread of this process instead (the
                path before the engine process existed; benchmarks compare the two, and tests
                that patch the pipeline use it); None: the config's (--omni-engine).
        """
        from ..diffusion.workers import PipelineBuilder

        videos = _open_job_store(config)  # first: a bad or unreachable store fails before the model loads
        spec = EngineSpec(
            PipelineBuilder(config.model, config.dtype),
            options=config.dit_options,
            engine_config=EngineConfig(max_batch_tokens=config.max_batch_tokens, max_running=config.max_queue,
                                       lora=config.lora_policy, loras=config.loras),
            stage_defaults=config.stage_defaults or None,
        )
        if not (config.engine_process if engine_process is None else engine_process):
            engine = spec.launch()
            return cls._assemble(config, PipelineInfo.of(engine), engine.pipeline.resolve,
                                 InlineDiffusion(EngineLoop(engine, config.max_queue)), videos)
        client = EngineCoreClient(spec, config.max_queue)
        client.start()
        return cls._assemble(config, client.info, client.resolve, InlineDiffusion(client), videos)

    @classmethod
    def attach_multistage(cls, config: OmniServerConfig, engine_client: Any, *, remote: bool = False) -> "OmniRuntime":
        """A multi-stage runtime around vLLM's AR engine client; call on the server's event loop.
        Which orchestrator runs it is the family's declaration (`orchestrator_for`).

        `remote`: the engine client is the AR servers of `--omni-stage dit` (orchestrator/remote.py);
        the orchestrator's engine loop is started by `start()`, on the server's loop."""
        from ..orchestrator import orchestrator_for

        videos = _open_job_store(config)
        orchestrator_cls = orchestrator_for(config.model, config.stage_config)
        attach = orchestrator_cls.attach_remote if remote else orchestrator_cls.attach
        # the DiT stage in its own process (--omni-engine process): this blocks until it has loaded
        orchestrator = attach(config.model, config.stage_config, engine_client, dtype=config.dtype,
                              max_queue=config.max_queue, engine_process=config.engine_process)
        return cls._assemble(config, orchestrator.info, _stage_resolver(orchestrator),
                             MultiStage(orchestrator, config.max_queue), videos)

    @classmethod
    def _assemble(cls, config: OmniServerConfig, pipeline: PipelineInfo, resolve_fn: Any,
                  stages: InlineDiffusion | MultiStage, videos: JobStore) -> "OmniRuntime":
        # The diffusion engine's own stage defaults: what offline Omni resolves with too.
        stage_defaults = pipeline.stage_defaults
        caps = pipeline.capabilities
        builder = RequestBuilder(resolve_fn, caps, stage_defaults, config.limits)
        logger.info(
            "omni: serving %s (%s, makes %s%s; DiT in %s) as %s; diffusion stage defaults %s; AR engine args from flags %s",
            config.model, pipeline.family, caps.output, " and text" if stages.text else "", pipeline.dtype or "?",
            ", ".join(config.served_model_names), config.stage_defaults or "none", config.ar_engine_args or "none",
        )
        metrics = OmniMetrics(stages.bridge)
        if isinstance(stages, MultiStage):
            stages.timings_observer = metrics.observe_stage_timings
        return cls(
            config=config,
            pipeline=pipeline,
            builder=builder,
            stages=stages,
            metrics=metrics,
            media=MediaFetcher(config),
            videos=videos,
            adapters=dict(config.loras),
        )

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    # ---- LoRA adapters (in the engine, which may live in its own process) ---------------------
    async def lora_call(self, method: str, *args: Any) -> Any:
        """`DiffusionEngine.load_lora / unload_lora / list_loras`, through the engine-core RPC or in-process."""
        bridge = self.bridge
        if isinstance(bridge, EngineCoreClient):
            return await asyncio.to_thread(bridge.call, method, args)
        return await asyncio.to_thread(getattr(bridge.engine, method), *args)

    def lora_names(self) -> list[str]:
        """The adapters served now (the names `model` may carry); kept here as the routes change them."""
        return list(self.adapters)

    async def start(self) -> None:
        await self.stages.start()
        self._janitor = asyncio.create_task(self._expire_videos())

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self.stages.stop()
        # the engine is gone: let the unfinished video jobs record that before the store closes
        if self.videos.tasks:
            await asyncio.wait(set(self.videos.tasks.values()), timeout=10)
        self.videos.close()

    async def _expire_videos(self) -> None:
        """The job store's housekeeping: this server's heartbeat, the jobs of servers that
        stopped heartbeating (failed, with the reason), and expired jobs."""
        store = self.videos
        period = max(0.5, min(HEARTBEAT_S, self.config.video_retention_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await store.call(store.heartbeat)
                for video_id in await store.call(store.reap):
                    logger.warning("omni: video %s failed: the server running it stopped heartbeating", video_id)
                for video_id in await store.call(store.expire):
                    logger.info("omni: video %s expired and was deleted", video_id)
            except OmniHTTPError as exc:  # the store is unreachable: try again next period
                logger.error("omni: job store housekeeping failed: %s", exc.message)


def _stage_resolver(orchestrator: Any) -> Callable[..., ResolvedParams]:
    """`resolve(request, stage_defaults)` for the request builder, by the DiT stage (wherever it runs)."""
    def resolve(request: Any, stage_defaults: Any = None) -> ResolvedParams:
        return orchestrator.resolve(request)  # (with the stage's own defaults, which the builder passes)

    return resolve


def _open_job_store(config: OmniServerConfig) -> JobStore:
    return JobStore(config.job_store, config.video_retention_s, config.video_dir)
