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

from vllm_omni_plugin.diffusion.capabilities import InvalidParams
from vllm_omni_plugin.orchestrator.engine_loop import GenerationFailed
from vllm_omni_plugin.server.app import OmniRuntime
from vllm_omni_plugin.server.config import OmniServerConfig
from vllm_omni_plugin.server.flags import parse_args
from vllm_omni_plugin.server.launch import build_app

from .openapi_bodies import assert_omni_bodies

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
            # a chat stream fails after its role chunk: the error is its last `data:` chunk
            stream = await client.chat.completions.create(
                model=runtime.model_name, messages=[{"role": "user", "content": "explode"}], stream=True,
                extra_body={"modalities": ["image"], "seed": 1})
            got = []
            with pytest.raises(openai.APIError) as streamed:
                async for chunk in stream:
                    got.append(chunk)
            assert [c.choices[0].delta.role for c in got] == ["assistant"]
            assert streamed.value.body["code"] == 500 and FAULT in streamed.value.body["message"]
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




async def _resolve_faults(args) -> dict[str, object]:
    """One app: its OpenAPI document; a bug in the pipeline's `resolve` (after the body was checked);
    a refusal `resolve` declares as the caller's (InvalidParams); then a normal request."""
    runtime = await asyncio.to_thread(OmniRuntime.load, OmniServerConfig.from_args(args))
    real = runtime.builder.resolve_fn

    def resolve(request, stage_defaults):
        if request.prompt == "resolve bug":
            raise TypeError("a bug in resolve")
        if request.prompt == "refused":
            raise InvalidParams("this pipeline refuses this seed", "seed")
        return real(request, stage_defaults)

    runtime.builder.resolve_fn = resolve
    app = build_app(args, runtime)
    for plugin in app.state.endpoint_plugins:
        await plugin.init_state(None, app.state, args)
    out: dict[str, object] = {}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://omni") as http:
            out["openapi"] = (await http.get("/openapi.json")).json()
            out["bug"] = await http.post("/v1/images/generations", json={"prompt": "resolve bug", "seed": 1})
            out["refused"] = await http.post("/v1/images/generations", json={"prompt": "refused", "seed": 1})
            out["served"] = await http.post("/v1/images/generations", json={"prompt": "fine", "seed": 1})
    finally:
        await runtime.stop()
    return out


def test_resolve_bug_is_a_500_declared_refusal_a_400_and_openapi_shows_every_body(checkpoint):
    args = parse_args([str(checkpoint("qwen-image")), "--default-sampling-params",
                       '{"num_inference_steps": 2, "height": 32, "width": 32}'])
    out = asyncio.run(_resolve_faults(args))

    bug = out["bug"]
    rid = bug.headers["x-request-id"]
    assert bug.status_code == 500 and rid in bug.json()["error"]["message"]
    assert "TypeError: a bug in resolve" in bug.json()["error"]["message"]
    refused = out["refused"].json()["error"]
    assert out["refused"].status_code == 400 and refused["param"] == "seed" and "refuses this seed" in refused["message"]
    assert out["served"].status_code == 200 and out["served"].json()["data"][0]["b64_json"]

    document = out["openapi"]
    schemas = assert_omni_bodies(document)
    generation = schemas["ImageGenerationRequest"]
    assert generation["required"] == ["prompt"] and generation["additionalProperties"] is False
    props = generation["properties"]
    # OpenAI's names and types; our extension fields beside them
    assert {"type": "integer", "minimum": 1} in props["n"]["anyOf"]
    assert props["output_format"]["anyOf"][0]["enum"] == ["png", "jpeg", "webp"]
    assert {"num_inference_steps", "negative_prompt", "seed", "guidance_scale", "true_cfg_scale"} <= set(props)
    assert schemas["ImageEditForm"]["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    assert "image_url" in schemas["ImageURL"]["properties"]
