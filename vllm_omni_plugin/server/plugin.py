"""The omni routes as a `vllm.endpoint_plugins` entry point ("omni").

vLLM 0.32's API server (`vllm.entrypoints.launchers.app.build_app`) loads
endpoint plugins named in `VLLM_PLUGINS`, calls `attach_router(app)` after its
own routers (a plugin route replaces vLLM's route of the same path and method)
and `init_state(engine_client, state, args)` in `init_app_state`, with the
engine client it created for the model. `vllm serve MODEL --omni` allowlists
"omni" (`allowlist_omni`) and runs that server unchanged for checkpoints with
an AR stage:

* every vLLM route and flag stays: completions, responses, tokenize, models,
  streaming, logprobs, tools ... answered by vLLM's handlers;
* the omni routes are added: /v1/images/generations, /v1/images/edits,
  /v1/videos (refused for image models), and POST /v1/chat/completions is
  replaced by one route that decides by the requested output -- text goes on
  to vLLM's own chat handler, images to the request builder and the BAGEL
  orchestrator, which runs its AR prefills on vLLM's engine client;
* GET /omni/playground: a page to try the model in a browser (routes/playground.py);
* /health answers 503 when either stage is down; the omni metrics join vLLM's
  Prometheus registry (GET /metrics); every error body is OpenAI-shaped.

The diffusion-only app (server/launch.py: build_app) attaches the same plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from importlib.metadata import entry_points
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ..orchestrator.offline import multistage_config
from ..orchestrator.stage_config import StageConfigError
from ..request.protocol import openapi_components
from .app import OmniRuntime
from .config import OmniServerConfig
from .errors import install_error_handlers, wrap_app_errors
from .flags import add_omni_args
from .routes import chat, images, meta, playground, videos

logger = logging.getLogger("vllm.omni_plugin.server")

#: the name of this package's entry points (general plugin and endpoint plugin) in VLLM_PLUGINS
PLUGIN_NAME = "omni"
# Entry-point groups whose plugins load when VLLM_PLUGINS is unset (vllm/plugins/__init__.py);
# endpoint plugins load only when named.
_UNGATED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                   "vllm.stat_logger_plugins")


def allowlist_omni() -> str:
    """Name "omni" in VLLM_PLUGINS so vLLM's server loads the omni routes, changing nothing else:
    unset, it becomes every installed plugin of the groups that load when it is unset, plus "omni";
    set, "omni" is added to the operator's list.

    Returns:
        the new value of VLLM_PLUGINS.
    """
    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = {ep.name for group in _UNGATED_GROUPS for ep in entry_points(group=group)}
    else:
        names = {n.strip() for n in current.split(",") if n.strip()}
    names.add(PLUGIN_NAME)
    os.environ["VLLM_PLUGINS"] = ",".join(sorted(names))
    return os.environ["VLLM_PLUGINS"]


def omni_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the omni flags' defaults filled in where vLLM's parser did not add them (the routes
    loaded into a server started without `--omni`)."""
    defaults = add_omni_args(argparse.ArgumentParser(add_help=False)).parse_args([])
    for key, value in vars(defaults).items():
        if not hasattr(args, key):
            setattr(args, key, value)
    # `vllm serve --omni` may point vLLM at the AR stage's sub-folder (GLM-Image's
    # vision_language_encoder); the omni routes serve the whole checkpoint.
    model = getattr(args, "omni_model", None)
    return args if model is None else argparse.Namespace(**{**vars(args), "model": model})


def _is_multistage(args: argparse.Namespace) -> bool:
    try:
        return multistage_config(args.model, getattr(args, "stage_configs_path", None)) is not None
    except (StageConfigError, OSError, ValueError) as e:
        logger.warning("omni: no omni routes for %s: %s", args.model, e)
        return False


def _vllm_route(app: FastAPI, path: str, method: str) -> Any:
    """The request handler of vLLM's own route (before a plugin replaces it), or None."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route.get_route_handler()
    return None


def _document_bodies(app: FastAPI) -> None:
    """Put the omni request-body schemas into `app`'s OpenAPI document (`components.schemas`,
    which each omni route's `requestBody` refers to), with the served model's own knobs. The routes
    read their bodies themselves (the request layer's checks, not FastAPI's), so FastAPI does not
    find these models on its own. Built on the first request for the document: by then the runtime
    (and so the served model's declaration) is there on both apps."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            omni = getattr(app.state, "omni", None)
            knobs = omni.pipeline.capabilities.knobs if omni is not None else None
            document.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components(knobs))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class OmniEndpointPlugin:
    """The omni routes in the shape of vLLM's `EndpointPlugin` protocol.

    Made by vLLM with no arguments (the entry point); `build_app` of the
    diffusion-only server hands it the runtime it loaded.
    """

    name = PLUGIN_NAME
    required_tasks = ("generate",)  # BAGEL's routes need the AR engine (not the render-only server)

    def __init__(self, runtime: Any = None) -> None:
        self.runtime = runtime
        self.active = runtime is not None

    def attach_router(self, app: FastAPI) -> None:
        """Add the omni routes to `app` (vLLM's, or the diffusion-only one)."""
        args = omni_args(app.state.args)
        if args.omni_stage == "ar":  # the AR stage alone: vLLM's routes, the stage's info (server/ar_stage.py)
            from . import ar_stage

            ar_stage.attach(app, app.state.args, args.model)
            self.active = False
            return
        if not self.active:
            self.active = _is_multistage(omni_args(app.state.args))
            if not self.active:
                logger.info("omni: %s has no multi-stage stage config; no omni routes attached", app.state.args.model)
                return
        # vLLM's chat handler answers text (None on the diffusion-only app, which has none)
        app.state.omni_text_chat = _vllm_route(app, "/v1/chat/completions", "POST")
        routers = [images.router, videos.router, chat.router, meta.router, playground.router]
        if app.state.omni_text_chat is None:
            routers.append(meta.models_router)  # vLLM's /v1/models where vLLM serves the model
            if meta.runtime_lora_updating():
                routers.append(meta.lora_router)
        for router in routers:
            app.include_router(router)
        _document_bodies(app)
        install_error_handlers(app)
        wrap_app_errors(app)
        self._stop_with(app)

    async def init_state(self, engine_client: Any, state: Any, args: argparse.Namespace) -> None:
        """Attach the BAGEL orchestrator to vLLM's engine client (or start the given runtime)."""
        if not self.active:
            return
        if self.runtime is None:
            if engine_client is None:
                raise RuntimeError("the omni routes of a multi-stage model need vLLM's AR engine client")
            config = OmniServerConfig.from_args(omni_args(args))
            self.runtime = OmniRuntime.attach_multistage(config, engine_client)
        await self.runtime.start()
        self.runtime.metrics.expose_in_vllm_registry()
        state.omni = self.runtime

    def _stop_with(self, app: FastAPI) -> None:
        """Stop the runtime (DiT engine thread, video janitor) when the app's lifespan ends."""
        inner = app.router.lifespan_context
        plugin = self

        @contextlib.asynccontextmanager
        async def lifespan(app_: FastAPI):
            async with inner(app_) as value:
                try:
                    yield value
                finally:
                    if plugin.runtime is not None:
                        await plugin.runtime.stop()

        app.router.lifespan_context = lifespan


__all__ = ["OmniEndpointPlugin", "allowlist_omni", "omni_args", "PLUGIN_NAME"]
