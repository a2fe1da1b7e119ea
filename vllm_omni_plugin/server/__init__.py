"""`vllm serve MODEL --omni`: OpenAI-compatible image, edit, video and chat routes.

Diffusion checkpoints run on the diffusion engine; multi-stage checkpoints
(BAGEL) on the `BagelOrchestrator` (AR stage on vLLM, DiT stage inline), which
also answers chat in text.

    cli.py        argv -> vLLM's own serve parser + the "Omni" argument group
    config.py     OmniServerConfig: the omni flags, the stage config, the AR engine's flags
    launch.py     load the model, build the app, serve it with vLLM's HTTP launcher
    app.py        the app factory, OmniRuntime (InlineDiffusion | MultiStage), OmniEndpointPlugin
    (EngineLoop, the diffusion engine on a background thread, lives in orchestrator/engine_loop.py)
    videos.py     VideoStore: video jobs, their files, retention
    media.py      image URLs: vLLM's media settings -> the request layer's one image path
    encode.py     images -> png / jpeg / webp base64
    errors.py     OpenAI-format error bodies
    metrics.py    Prometheus metrics of the omni routes and the engine
    routes/       images.py, chat.py, videos.py, meta.py (models, health, metrics)

Every route builds its request with `vllm_omni_plugin.request.RequestBuilder`.
"""
