"""`vllm serve MODEL --omni`: OpenAI-compatible image, edit, video and chat routes.

Checkpoints with an AR stage (BAGEL) are served by vLLM's own OpenAI API
server with the omni routes attached as a `vllm.endpoint_plugins` entry point:
vLLM answers text (chat, completions, responses, streaming, logprobs ...), the
`BagelOrchestrator` answers images on vLLM's AR engine client. Diffusion-only
checkpoints are served by an app made of vLLM's pieces with the same routes.

    cli.py        argv -> vLLM's own serve parser + the "Omni" argument group
    config.py     OmniServerConfig: the omni flags, the stage config, the AR engine's flags
    launch.py     AR checkpoints: vLLM's API server; diffusion-only: build_app on vLLM's launcher
    plugin.py     OmniEndpointPlugin (the "omni" endpoint plugin), VLLM_PLUGINS allowlisting
    app.py        OmniRuntime (InlineDiffusion | MultiStage), build_app of diffusion-only checkpoints
    (EngineLoop, the diffusion engine on a background thread, lives in orchestrator/engine_loop.py)
    videos.py     VideoJob: one video job's record and its public JSON
    job_store.py  JobStore: video jobs and their mp4s in SQLite or Postgres (replicas share one)
    media.py      image URLs: vLLM's media settings -> the request layer's one image path
    encode.py     images -> png / jpeg / webp base64
    errors.py     OpenAI-format error bodies, for every status and every layer that answers
    metrics.py    Prometheus metrics of the omni routes and the engine (on vLLM's registry)
    routes/       images.py, chat.py, videos.py, meta.py (health; models of diffusion-only apps)

Every omni route builds its request with `vllm_omni_plugin.request.RequestBuilder`.
"""
