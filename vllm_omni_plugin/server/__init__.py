"""`vllm serve MODEL --omni`: OpenAI-compatible image, edit, video and chat routes.

Checkpoints with an AR stage (BAGEL) are served by vLLM's own OpenAI API
server with the omni routes attached as a `vllm.endpoint_plugins` entry point:
vLLM answers text (chat, completions, responses, streaming, logprobs ...), the
`BagelOrchestrator` answers images on vLLM's AR engine client. Diffusion-only
checkpoints are served by an app made of vLLM's pieces with the same routes.

    flags.py      vLLM's own serve parser + the "Omni" argument group (a leaf: imports nothing here)
    cli.py        the entry points: `vllm serve --omni` / `vllm-omni serve` -> launch.run_server
    config.py     OmniServerConfig: the omni flags, the stage config, the AR engine's flags
    launch.py     run_server: AR checkpoints on vLLM's API server; diffusion-only: build_app (the
                  app factory) on vLLM's launcher
    plugin.py     OmniEndpointPlugin (the "omni" endpoint plugin), VLLM_PLUGINS allowlisting
    app.py        OmniRuntime (InlineDiffusion | MultiStage): what the routes run requests on
    (EngineLoop, the diffusion engine on a background thread, lives in orchestrator/engine_loop.py)
    videos.py     VideoJob: one video job's record and its public JSON
    job_store.py  JobStore: video jobs and their mp4s in SQLite or Postgres (replicas share one)
    media.py      image URLs: vLLM's media settings -> the request layer's one image path
    encode.py     images -> png / jpeg / webp base64
    errors.py     OpenAI-format error bodies, for every status and every layer that answers
    metrics.py    Prometheus metrics of the omni routes and the engine (on vLLM's registry)
    routes/       the routes: images.py, chat.py, videos.py, meta.py (health; models of diffusion-only
                  apps); each reads its body (models: request/protocol.py) and calls
    serving/      what runs it: the canonical request -> the engine -> the answer

Every omni route builds its request with `vllm_omni_plugin.request.RequestBuilder`.
"""
