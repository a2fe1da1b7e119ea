"""Start the omni server: vLLM's socket setup and HTTP launcher around our app."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .app import OmniRuntime, build_app
from .config import OmniServerConfig

logger = logging.getLogger("vllm.omni_plugin.server")


async def run_server(args: argparse.Namespace) -> None:
    import vllm.envs as envs
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    config = OmniServerConfig.from_args(args)
    listen_address, sock = setup_server(args, reuse_port=False)
    if config.multi_stage:
        # The orchestrator (and its AsyncLLM) lives on this, the server's, event loop.
        runtime = await OmniRuntime.create_multistage(config)
    else:
        runtime = await asyncio.to_thread(OmniRuntime.load, config)
    app = build_app(args, runtime)
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
