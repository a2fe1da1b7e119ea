"""The diffusion engine core process and the client every caller uses.

    spec.py     EngineSpec (what an engine core builds), PipelineInfo (what callers
                read about the loaded model: family, declaration, stage defaults)
    client.py   EngineCoreClient: the engine in its own process (the server's; `Omni(...,
                engine_process=True)`), sync and asyncio, restarts a dead engine
    local.py    LocalEngineClient: the same calls, the engine in the caller's thread
                (offline `Omni`'s default)
    core.py     the engine-core process: `python -m vllm_omni_plugin.engine.core`
    messages.py the msgspec messages between them; codec.py: values as msgpack + raw frames
    errors.py   how a request ends other than with its output (QueueFull, StageUnavailable ...)

No vLLM here (ARCHITECTURE.md, principle 3). Importing this package imports nothing.
"""
