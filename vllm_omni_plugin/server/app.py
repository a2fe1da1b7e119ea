"""The app factory and the omni routes as a vLLM endpoint plugin.

Two ways the routes get served, one set of routes:

* diffusion-only checkpoints (now): `build_diffusion_app` makes a FastAPI app
  of our own -- there is no AsyncLLM to build -- with vLLM's middleware
  (CORS, --api-key authentication, request ids, --middleware) and vLLM's
  exception handlers, and attaches `OmniEndpointPlugin`;
* multi-stage checkpoints (BAGEL, issue 5): vLLM's own `build_app` +
  `init_app_state` on the AR stage's AsyncLLM give the text routes, and the same
  `OmniEndpointPlugin` is attached after them (its object satisfies vLLM's
  `EndpointPlugin` protocol: `attach_router` + `init_state`), so our
  /v1/chat/completions can take image requests and hand text ones to vLLM's.
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

from ..diffusion.engine import DiffusionEngine, EngineConfig
from ..diffusion.interface import DiffusionPipelineBase
from ..request import RequestBuilder
from ..orchestrator.engine_loop import EngineLoop
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


@dataclass
class OmniRuntime:
    """Everything the omni routes use; lives on `app.state.omni`."""

    config: OmniServerConfig
    pipeline: DiffusionPipelineBase
    builder: RequestBuilder
    bridge: EngineLoop
    metrics: OmniMetrics
    media: MediaFetcher
    videos: VideoStore
    created: int = field(default_factory=lambda: int(time.time()))
    _janitor: asyncio.Task | None = None

    @classmethod
    def load(cls, config: OmniServerConfig) -> "OmniRuntime":
        from ..diffusion.loader import load_pipeline

        pipeline = load_pipeline(config.model, dtype=config.dtype)
        engine = DiffusionEngine(
            pipeline,
            EngineConfig(max_batch_tokens=config.max_batch_tokens, max_running=config.max_queue),
            config.stage_defaults or None,
        )
        bridge = EngineLoop(engine, config.max_queue)
        builder = RequestBuilder(
            pipeline.resolve,
            output_kind(pipeline),
            config.stage_defaults or None,
            config.limits,
            takes_images=takes_images(pipeline),
        )
        logger.info(
            "omni: serving %s (%s, makes %s) as %s; stage defaults %s",
            config.model, pipeline.family, builder.output_kind, ", ".join(config.served_model_names),
            config.stage_defaults or "none",
        )
        return cls(
            config=config,
            pipeline=pipeline,
            builder=builder,
            bridge=bridge,
            metrics=OmniMetrics(bridge),
            media=MediaFetcher(config),
            videos=VideoStore(config.video_dir, config.video_retention_s),
        )

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    async def start(self) -> None:
        self.bridge.start()
        self._janitor = asyncio.create_task(self._expire_videos())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await asyncio.to_thread(self.bridge.stop)
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
            self.runtime = await asyncio.to_thread(OmniRuntime.load, OmniServerConfig.from_args(args))
        state.omni = self.runtime


def build_diffusion_app(args: argparse.Namespace, runtime: OmniRuntime) -> FastAPI:
    """The app for a single-stage diffusion checkpoint (no vLLM engine)."""
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
    app.state.engine_client = None  # vLLM's serve_http looks for one; there is none here
    app.state.omni = runtime
    init_exception_handler(app)  # vLLM's: framework errors, VLLMError, last-resort 500
    OmniEndpointPlugin(runtime).attach_router(app)  # ours on top (request / queue / engine errors)
    init_entrypoints_middleware(args, app, ())  # CORS, --api-key, request ids, --middleware
    return app
