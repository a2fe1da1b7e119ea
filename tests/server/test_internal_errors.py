"""A failure after validation is the server's: 500, the request id in the body and the
X-Request-Id header, the traceback in the log under that id -- never a 400.

In process: the real diffusion-only app (`build_app`: vLLM's middleware and exception handlers,
the omni plugin) on the real tiny Qwen-Image runtime, driven by the real openai client over
httpx's ASGI transport. The fault: the pipeline's `prepare_many` raises a ValueError for one
prompt (the shape of a model-specific refusal the request builder did not foresee); the next
request is served normally.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest

from vllm_omni_plugin.orchestrator.engine_loop import GenerationFailed
from vllm_omni_plugin.server.app import OmniRuntime, build_app
from vllm_omni_plugin.server.cli import parse_args
from vllm_omni_plugin.server.config import OmniServerConfig

pytestmark = pytest.mark.engine

FAULT = "refused after validation"


async def _serve_and_ask(args) -> tuple[openai.InternalServerError, object]:
    # The engine on a thread of this process (the server runs it in its own process,
    # tests/server/test_engine_process.py): the test patches its pipeline.
    runtime = await asyncio.to_thread(OmniRuntime.load, OmniServerConfig.from_args(args), engine_process=False)
    pipeline = runtime.bridge.engine.pipeline
    real = pipeline.prepare_many

    def prepare_many(params, request_ids):
        if any(p.prompt == "explode" for p in params):
            raise ValueError(FAULT)
        return real(params, request_ids)

    pipeline.prepare_many = prepare_many
    app = build_app(args, runtime)
    for plugin in app.state.endpoint_plugins:  # phase B, as launch.py runs it
        await plugin.init_state(None, app.state, args)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://omni") as http:
            client = openai.AsyncOpenAI(base_url="http://omni/v1", api_key="unused", http_client=http, max_retries=0)
            with pytest.raises(openai.InternalServerError) as failed:
                await client.images.generate(prompt="explode", extra_body={"seed": 1})
            served = await client.images.generate(prompt="fine", extra_body={"seed": 1})
    finally:
        await runtime.stop()
    return failed.value, served


def test_pipeline_value_error_is_a_500_with_request_id(checkpoint, caplog):
    args = parse_args([str(checkpoint("qwen-image")), "--default-sampling-params",
                       '{"num_inference_steps": 2, "height": 32, "width": 32}'])
    server_log = logging.getLogger("vllm.omni_plugin.server")
    server_log.addHandler(caplog.handler)  # vLLM's logger tree may not propagate to the root
    try:
        err, served = asyncio.run(_serve_and_ask(args))
    finally:
        server_log.removeHandler(caplog.handler)

    rid = err.response.headers["x-request-id"]
    body = err.response.json()["error"]
    assert err.status_code == 500 and body["code"] == 500 and body["type"] == "InternalServerError"
    assert set(body) == {"message", "type", "param", "code"}
    assert rid.startswith("images-") and rid in body["message"] and f"ValueError: {FAULT}" in body["message"]

    # one record (caplog may hold it twice: through the handler added above and through the root)
    logged = list({id(r): r for r in caplog.records if rid in r.getMessage()}.values())
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    exc = logged[0].exc_info[1]
    assert isinstance(exc, GenerationFailed) and isinstance(exc.__cause__, ValueError)

    assert served.data[0].b64_json and served.model_extra["omni"]["request_id"] != rid
