"""Start the omni server: vLLM's socket setup and HTTP launcher around our app."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from .app import OmniRuntime, build_diffusion_app
from .config import ConfigError, OmniServerConfig

logger = logging.getLogger("vllm.omni_plugin.server")


def checkpoint_kind(model: str) -> str:
    """"diffusion" for a diffusers directory (model_index.json), "multi-stage" for an HF model dir."""
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(
            f"{model!r} is not a local checkpoint directory; `vllm serve --omni` loads local checkpoints "
            "(download the model first, or build one with `vllm-omni make-checkpoint`)"
        )
    if (path / "model_index.json").is_file():
        return "diffusion"
    if (path / "config.json").is_file():
        return "multi-stage"
    raise ConfigError(f"{model}: neither model_index.json (diffusers) nor config.json (transformers) found")


async def run_server(args: argparse.Namespace) -> None:
    import vllm.envs as envs
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    config = OmniServerConfig.from_args(args)
    kind = checkpoint_kind(config.model)
    if kind != "diffusion":
        raise ConfigError(
            f"{config.model} is a multi-stage (AR + diffusion) checkpoint; serving it with --omni lands with "
            "the multi-stage orchestrator (issue 5). Plain `vllm serve` serves its text part today."
        )
    listen_address, sock = setup_server(args, reuse_port=False)
    runtime = await asyncio.to_thread(OmniRuntime.load, config)
    app = build_diffusion_app(args, runtime)
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
