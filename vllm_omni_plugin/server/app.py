"""The app factory, the omni runtime and the omni routes as a vLLM endpoint plugin.

One app, one set of routes, two kinds of runtime behind them:

* diffusion-only checkpoints: `InlineDiffusion`, one diffusion engine on a
  background thread (`EngineLoop`);
* multi-stage checkpoints (BAGEL): `MultiStage`, the `BagelOrchestrator`
  created on the server's event loop -- the AR stage on vLLM's AsyncLLM, the
  DiT stage inline -- the same orchestrator offline `Omni` runs. It answers
  text chat (text2text, img2text) from the AR stage and images (text2img,
  img2img) from AR -> DiT.

`build_app` makes a FastAPI app of our own with vLLM's middleware (CORS,
--api-key authentication, request ids, --middleware) and vLLM's exception
handlers, and attaches `OmniEndpointPlugin` (an object with vLLM's
`EndpointPlugin` shape: `attach_router` + `init_state`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from vllm.exceptions import VLLMClientError

from ..diffusion.engine import EngineConfig
from ..diffusion.interface import DiffusionPipelineBase
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from ..orchestrator.engine_loop import EngineLoop, ProgressFn, QueueFull
from ..request import RequestBuilder, RequestError
from .config import OmniServerConfig
from .errors import install_error_handlers
from .media import MediaFetcher
from .metrics import OmniMetrics
from .videos import VideoStore

logger = logging.getLogger("vllm.omni_plugin.server")


def output_kind(pipeline: DiffusionPipelineBase) -> str:
    """"image" | "layers" | "video": what a loaded pipeline makes.

    Workaround: the pipelines do not declare it (see docs/server.md, "needed
    upstream"); decided from the family name, and for the generic fallback from
    the diffusers pipeline having a video processor.
    """
    family = getattr(pipeline, "family", "")
    if family == "qwen-image-layered":
        return "layers"
    if family.startswith("wan"):
        return "video"
    if family == "generic" and hasattr(pipeline.pipe, "video_processor"):
        return "video"
    return "image"


def takes_images(pipeline: DiffusionPipelineBase) -> bool:
    """Whether a loaded pipeline takes input images (same workaround as `output_kind`)."""
    family = getattr(pipeline, "family", "")
    if family in ("qwen-image-edit", "qwen-image-layered", "wan-i2v"):
        return True
    if family == "generic":
        import inspect

        return "image" in inspect.signature(type(pipeline.pipe).__call__).parameters
    return False


class InlineDiffusion:
    """A single-stage diffusion model: the engine on a background thread."""

    text = False  # no text output
    text_defaults = None

    def __init__(self, bridge: EngineLoop) -> None:
        self.bridge = bridge

    @property
    def alive(self) -> bool:
        return self.bridge.alive

    async def start(self) -> None:
        self.bridge.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.bridge.stop)
        self.bridge.engine.close()  # a multi-GPU DiT's worker ranks (after the engine thread ended)

    async def generate_image(self, params: ResolvedParams, on_progress: ProgressFn | None = None) -> DiffusionOutput:
        handle = self.bridge.submit(params, on_progress)
        try:
            return await self.bridge.result(handle)
        except asyncio.CancelledError:
            self.bridge.abort(handle.request_id)  # the caller went away: stop at the next step
            raise


def client_error(exc: BaseException, param: str | None = None) -> RequestError:
    """A request refused by vLLM (its validation errors, or a ValueError) as our 400, keeping vLLM's parameter name."""
    if isinstance(exc, RequestError):
        return exc
    return RequestError(str(exc), getattr(exc, "parameter", None) or param)


class MultiStage:
    """A multi-stage model (BAGEL) through its orchestrator, on the server's event loop.

    Image requests count against --omni-max-queue from the moment they are
    admitted (before the AR prefill), so the limit bounds the whole pipeline;
    text requests are queued by vLLM's scheduler, as in plain `vllm serve`.
    """

    text = True

    def __init__(self, orchestrator: Any, max_queue: int) -> None:
        self.orchestrator = orchestrator
        self.bridge: EngineLoop = orchestrator.loop
        self.max_queue = max_queue
        self.images_in_flight = 0

    @property
    def text_defaults(self) -> dict[str, Any]:
        """The AR stage's default sampling params (stage config)."""
        return self.orchestrator.ar_defaults

    @property
    def alive(self) -> bool:
        llm = self.orchestrator.llm
        return self.bridge.alive and llm is not None and not llm.errored

    async def start(self) -> None:
        pass  # the orchestrator started its engines when it was created

    async def stop(self) -> None:
        await self.orchestrator.shutdown()

    async def generate_image(self, params: ResolvedParams, on_progress: ProgressFn | None = None) -> DiffusionOutput:
        if self.images_in_flight >= self.max_queue:
            self.bridge.stats.rejected += 1
            raise QueueFull(
                f"the server is at capacity ({self.images_in_flight} image requests in the pipeline, "
                f"--omni-max-queue {self.max_queue}); retry later"
            )
        self.images_in_flight += 1
        try:
            return await self.orchestrator.generate_image(params, on_progress, request_id=self.orchestrator.new_id("omni"))
        except (ValueError, VLLMClientError) as e:  # the AR stage refused it (e.g. prompt longer than max_model_len)
            raise client_error(e) from e
        finally:
            self.images_in_flight -= 1

    async def generate_text(self, prompt: Any, sampling_params: Any) -> Any:
        try:
            return await self.orchestrator.generate_text(prompt, sampling_params, self.orchestrator.new_id("chatcmpl"))
        except (ValueError, VLLMClientError) as e:  # vLLM's input checks (prompt too long, too many images ...)
            raise client_error(e) from e

    @staticmethod
    def text_params(values: Any) -> Any:
        """Resolved sampling values -> vllm.SamplingParams; vLLM's own checks of them are 400s."""
        from vllm import SamplingParams as VllmSamplingParams

        try:
            return VllmSamplingParams(**values)
        except (ValueError, TypeError, VLLMClientError) as e:
            raise client_error(e) from e

    async def render(self, messages: list[dict[str, Any]]) -> Any:
        """Chat messages -> the AR engine's prompt, by vLLM's renderer of that engine (the
        checkpoint's chat template, as plain `vllm serve` renders it)."""
        from vllm.renderers.params import ChatParams

        try:
            params = ChatParams(chat_template_kwargs={"add_generation_prompt": True, "continue_final_message": False})
            _, prompt = await self.orchestrator.llm.renderer.render_messages_async(messages, params)
        except (ValueError, TypeError, KeyError, VLLMClientError) as e:
            raise client_error(e, "messages") from e
        return prompt


def extension_fields(pipeline: DiffusionPipelineBase) -> dict[str, Any]:
    """The model's own request knobs (BAGEL: cfg_text_scale, timestep_shift ...): the keys of its
    pipeline defaults that are not `SamplingParams` fields, with their default values (their types)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(SamplingParams)}
    return {k: v for k, v in pipeline.defaults().values.items() if k not in known}


@dataclass
class OmniRuntime:
    """Everything the omni routes use; lives on `app.state.omni`."""

    config: OmniServerConfig
    pipeline: DiffusionPipelineBase
    builder: RequestBuilder
    stages: InlineDiffusion | MultiStage
    metrics: OmniMetrics
    media: MediaFetcher
    videos: VideoStore
    created: int = field(default_factory=lambda: int(time.time()))
    _janitor: asyncio.Task | None = None
    _stopped: bool = False

    @property
    def bridge(self) -> EngineLoop:
        """The diffusion engine's loop (the final stage's, for a multi-stage model)."""
        return self.stages.bridge

    @classmethod
    def load(cls, config: OmniServerConfig) -> "OmniRuntime":
        """A diffusion-only runtime (blocking: loads the pipeline)."""
        from ..diffusion.workers import PipelineBuilder, launch_engine

        engine = launch_engine(
            PipelineBuilder(config.model, config.dtype),
            options=config.dit_options,
            engine_config=EngineConfig(max_batch_tokens=config.max_batch_tokens, max_running=config.max_queue),
            stage_defaults=config.stage_defaults or None,
        )
        pipeline = engine.pipeline
        return cls._assemble(config, pipeline, InlineDiffusion(EngineLoop(engine, config.max_queue)),
                             output_kind(pipeline), takes_images(pipeline))

    @classmethod
    async def create_multistage(cls, config: OmniServerConfig) -> "OmniRuntime":
        """A multi-stage runtime; call on the server's event loop (the orchestrator lives there)."""
        from ..orchestrator.bagel import BagelOrchestrator

        orchestrator = await BagelOrchestrator.create(
            config.model, config.stage_config, ar_engine_args=config.ar_engine_args,
            dtype=config.dtype, max_queue=config.max_queue,
        )
        return cls._assemble(config, orchestrator.pipeline, MultiStage(orchestrator, config.max_queue), "image", True)

    @classmethod
    def _assemble(cls, config: OmniServerConfig, pipeline: DiffusionPipelineBase, stages: InlineDiffusion | MultiStage,
                  kind: str, images_in: bool) -> "OmniRuntime":
        # The diffusion engine's own stage defaults: what offline Omni resolves with too.
        stage_defaults = stages.bridge.engine.stage_defaults
        builder = RequestBuilder(pipeline.resolve, kind, stage_defaults, config.limits, takes_images=images_in,
                                 extensions=extension_fields(pipeline), text_defaults=stages.text_defaults)
        logger.info(
            "omni: serving %s (%s, makes %s%s) as %s; diffusion stage defaults %s; AR engine args from flags %s",
            config.model, pipeline.family, kind, " and text" if stages.text else "",
            ", ".join(config.served_model_names), config.stage_defaults or "none", config.ar_engine_args or "none",
        )
        return cls(
            config=config,
            pipeline=pipeline,
            builder=builder,
            stages=stages,
            metrics=OmniMetrics(stages.bridge),
            media=MediaFetcher(config),
            videos=VideoStore(config.video_dir, config.video_retention_s),
        )

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

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
        self.videos.close()

    async def _expire_videos(self) -> None:
        period = max(0.5, min(30.0, self.config.video_retention_s / 4))
        while True:
            await asyncio.sleep(period)
            for video_id in self.videos.expire():
                logger.info("omni: video %s expired and was deleted", video_id)


class OmniEndpointPlugin:
    """The omni routes in the shape of vLLM's `EndpointPlugin` protocol."""

    name = "omni"
    required_tasks = None

    def __init__(self, runtime: OmniRuntime | None = None) -> None:
        self.runtime = runtime

    def attach_router(self, app: FastAPI) -> None:
        from .routes import chat, images, meta, videos

        for module in (images, videos, chat, meta):
            app.include_router(module.router)
        install_error_handlers(app)

    async def init_state(self, engine_client: Any, state: Any, args: argparse.Namespace) -> None:
        if self.runtime is None:
            config = OmniServerConfig.from_args(args)
            if config.multi_stage:
                self.runtime = await OmniRuntime.create_multistage(config)
            else:
                self.runtime = await asyncio.to_thread(OmniRuntime.load, config)
        state.omni = self.runtime


def build_app(args: argparse.Namespace, runtime: OmniRuntime) -> FastAPI:
    """The omni server's app, for either kind of runtime."""
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    if args.disable_fastapi_docs:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    else:
        app = FastAPI(lifespan=lifespan)
    app.root_path = args.root_path
    app.state.args = args
    # vLLM's serve_http looks for one (None: no vLLM engine, or one the orchestrator owns and stops)
    app.state.engine_client = None
    app.state.omni = runtime
    init_exception_handler(app)  # vLLM's: framework errors, VLLMError, last-resort 500
    OmniEndpointPlugin(runtime).attach_router(app)  # ours on top (request / queue / engine errors)
    init_entrypoints_middleware(args, app, ())  # CORS, --api-key, request ids, --middleware
    return app
