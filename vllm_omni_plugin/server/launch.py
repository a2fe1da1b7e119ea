"""Start the omni server.

* a checkpoint with an AR stage (BAGEL): vLLM's own OpenAI API server
  (`vllm.entrypoints.launchers.api_server.entry.run_server`: its engine
  client, its app factory, all of its routes and flags) with the AR stage's
  engine args from the stage config, and the omni routes allowlisted as the
  "omni" endpoint plugin (server/plugin.py);
* a diffusion-only checkpoint (no LLM engine): `build_app` (vLLM's pieces, the
  same plugin, around server/app.py's `OmniRuntime`) on vLLM's socket setup and
  HTTP launcher.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import vllm.envs as envs
from fastapi import FastAPI
from vllm.entrypoints.launchers.api_server.entry import run_server as vllm_run_server
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.instrumentator.metrics import attach_router as attach_metrics_router
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

from ..orchestrator.stages import ar_model_path, ar_stage_engine_args, stage_pair
from .app import OmniRuntime
from .config import ConfigError, OmniServerConfig
from .plugin import OmniEndpointPlugin, allowlist_omni

logger = logging.getLogger("vllm.omni_plugin.server")

# What a stage config's `default_sampling_params` of the AR stage may set through vLLM's
# --override-generation-config (vLLM's names: `max_new_tokens` is its `max_tokens`).
_GENERATION_CONFIG_KEYS = {"repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                           "frequency_penalty": "frequency_penalty", "temperature": "temperature",
                           "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "max_tokens": "max_new_tokens"}

# The AR stage's connectors that `--omni-stage` splits across hosts (orchestrator/remote.py): omni_kv
# (the prompt KV over NIXL) and inline (the AR's generated tokens, in vLLM's HTTP answer).
_CROSSES_HOSTS = ("omni_kv", "inline")


def ar_stage_args(args: argparse.Namespace, config: OmniServerConfig) -> dict[str, Any]:
    """The serve args that make vLLM's engine client the AR stage.

    Engine args: flags given on the command line > the stage config's `engine_args` (with its
    platform overlay, the OmniKVConnector's transfer directory, the stage's tokenizer and
    batch limit; orchestrator/stages.py). The model: the checkpoint, or the stage's
    `subfolder` (GLM-Image's vision_language_encoder), served under the names given (or the
    model as given). Text sampling defaults: an explicit `--override-generation-config` > the
    AR stage's `default_sampling_params` (only the keys vLLM's generation config carries;
    others are logged as not applied) > the checkpoint's generation config.

    Args:
        args: the parsed serve args.
        config: the omni config (its stage config and the explicitly given engine flags).

    Returns:
        attribute -> value to set on `args` before vLLM builds its engine client.
    """
    stage, _ = stage_pair(config.stage_config)
    out = ar_stage_engine_args(config.model, config.stage_config, config.ar_engine_args)
    out["model"] = ar_model_path(config.model, stage)
    out["omni_model"] = config.model  # what the omni routes serve (server/plugin.py: omni_args)
    out["served_model_name"] = list(config.served_model_names)
    defaults = stage.default_sampling_params
    unused = sorted(set(defaults) - set(_GENERATION_CONFIG_KEYS))
    if unused:
        logger.warning("omni: AR default_sampling_params %s have no vLLM generation-config key; not applied", unused)
    generation = {_GENERATION_CONFIG_KEYS[k]: v for k, v in defaults.items() if k in _GENERATION_CONFIG_KEYS}
    explicit = config.ar_engine_args.get("override_generation_config") or {}
    out["override_generation_config"] = {**generation, **explicit}
    if getattr(args, "omni_stage", None) == "ar":  # the AR stage alone
        if stage.connector == "omni_kv":  # its KV leaves over NIXL
            kv = dict(out["kv_transfer_config"])
            kv["kv_connector_extra_config"] = {**kv["kv_connector_extra_config"], "transport": "nixl",
                                               "lease_s": float(args.omni_kv_lease)}
            out["kv_transfer_config"] = kv
        else:  # its generated tokens are the hand-over: vLLM's tokens-in/tokens-out route, /inference/v1/generate
            out["enable_scale_out"] = True
        out["enable_server_load_tracking"] = True  # vLLM's /load: what a DiT server balances on
    return out


async def run_server(args: argparse.Namespace) -> None:
    """Serve `args.model` until the server shuts down (the checkpoint decides which server, above)."""
    config = OmniServerConfig.from_args(args)
    stage = getattr(args, "omni_stage", None)
    if stage is not None and not config.multi_stage:
        raise ConfigError(f"--omni-stage {stage}: {config.model} has one stage; serve it without --omni-stage")
    if stage is not None and stage_pair(config.stage_config)[0].connector not in _CROSSES_HOSTS:
        raise ConfigError(f"--omni-stage {stage}: the stages of {config.stage_config.name} hand over through "
                          f"{stage_pair(config.stage_config)[0].connector!r}, not a connector that crosses hosts "
                          f"({', '.join(_CROSSES_HOSTS)}); serve it colocated, without --omni-stage")
    if stage == "ar" and args.omni_ar_url:
        raise ConfigError("--omni-ar-url is a flag of --omni-stage dit (the AR servers it asks)")
    if stage == "dit":
        await _serve_dit_stage(args, config)
    elif config.multi_stage:
        await _serve_on_vllm(args, config)
    else:
        await _serve_diffusion(args, config)


async def _serve_on_vllm(args: argparse.Namespace, config: OmniServerConfig) -> None:
    # The DiT stage lives in the API server process: one of them, serving (vLLM's `serve` would
    # start several, or none, for these flags).
    if getattr(args, "headless", False) or (getattr(args, "api_server_count", None) or 1) != 1:
        raise ConfigError("`--omni` serves a multi-stage model from one API server process: drop --headless "
                          f"and --api-server-count (got {getattr(args, 'api_server_count', None)})")
    for key, value in ar_stage_args(args, config).items():
        setattr(args, key, value)
    logger.info("omni: serving %s on vLLM's OpenAI API server; VLLM_PLUGINS=%s", config.model, allowlist_omni())
    await vllm_run_server(args)


async def _serve_dit_stage(args: argparse.Namespace, config: OmniServerConfig) -> None:
    """`--omni-stage dit`: the image routes on the diffusion-only app, the AR stage on the servers
    of --omni-ar-url (orchestrator/remote.py)."""
    from ..orchestrator.remote import RemoteAR

    if not args.omni_ar_url:
        raise ConfigError("--omni-stage dit needs --omni-ar-url http://HOST:PORT[,...] (the AR servers, "
                          "started with `vllm serve MODEL --omni --omni-stage ar`)")
    remote = RemoteAR([u.strip() for u in args.omni_ar_url.split(",") if u.strip()], config.model,
                      ar_model_path(config.model, stage_pair(config.stage_config)[0]),
                      api_key=(args.api_key or [None])[0])
    remote.start_check = asyncio.create_task(remote.check_at_start())  # logs a mismatch at start (held: not GC'd)
    await _serve_diffusion(args, config, lambda: OmniRuntime.attach_multistage(config, remote, remote=True))


async def _serve_diffusion(args: argparse.Namespace, config: OmniServerConfig, load: Any = None) -> None:
    listen_address, sock = setup_server(args, reuse_port=False)
    runtime = await asyncio.to_thread(load or (lambda: OmniRuntime.load(config)))
    app = build_app(args, runtime)
    for plugin in app.state.endpoint_plugins:  # vLLM's phase B, as init_app_state runs it
        await plugin.init_state(None, app.state, args)
    logger.info("omni: starting server on %s", listen_address)
    shutdown_task = await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
    )
    try:
        await shutdown_task
    finally:
        sock.close()
        await runtime.stop()  # idempotent; the app's lifespan may not have run its shutdown half


def build_app(args: argparse.Namespace, runtime: OmniRuntime) -> FastAPI:
    """The app of a diffusion-only checkpoint (no LLM engine), built from vLLM's own pieces the way
    vLLM's `build_app` assembles them, with the omni routes attached by `OmniEndpointPlugin`.

    Args:
        args: the parsed `vllm serve ... --omni` arguments.
        runtime: the loaded diffusion runtime; started and stopped by the app's lifespan.

    Returns:
        the FastAPI app for vLLM's `serve_http`.
    """
    if args.disable_fastapi_docs:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    else:
        app = FastAPI()
    app.root_path = args.root_path
    app.state.args = args
    # vLLM's serve_http looks for one; a diffusion-only server has no vLLM engine
    app.state.engine_client = None
    # --omni-stage dit: text is served by the AR servers (routes/chat.py names them in its 400)
    app.state.omni_text_at = args.omni_ar_url if getattr(args, "omni_stage", None) == "dit" else None
    attach_metrics_router(app)  # vLLM's /metrics on vLLM's registry (the omni metrics join it)
    plugin = OmniEndpointPlugin(runtime)
    plugin.attach_router(app)
    init_exception_handler(app)  # vLLM's: framework errors, VLLMError, last-resort 500
    init_entrypoints_middleware(args, app, ())  # CORS, --api-key, request ids, --middleware
    app.state.endpoint_plugins = [plugin]
    return app
