"""Offline API: `Omni(model=PATH).generate(prompts, params)`.

Single-stage diffusion models run in one diffusion engine, every prompt of a
`generate` call submitted at once so their steps batch, through an engine client
(engine/): by default `LocalEngineClient`, the engine in this process and thread
(no start-up cost, `omni.pipeline` at hand -- notebooks, debugging, benchmarks of
the pipeline itself); with `engine_process=True` the `EngineCoreClient` the server
uses, the engine in its own process (a crash there is an error of the requests in
it and a restart, not a dead caller).
Multi-stage models (BAGEL, GLM-Image: AR stage in vLLM -> DiT stage) run
through the orchestrator (orchestrator/stages.py) their family declares,
chosen from the checkpoint's architecture; only that path imports vLLM.

A multi-stage `Omni` owns engine processes. Use it as a context manager (or call
`shutdown()`); one still open when the main thread ends is shut down then, before
the interpreter tears down what the shutdown needs, so a script that does neither
still exits quietly. vLLM starts its engine in a spawned process that re-imports the main
module: a script that builds a multi-stage `Omni` at top level must do it under
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import itertools
import threading
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch

from .diffusion.acceleration import DitOptions
from .diffusion.cuda_graphs import DEFAULT_MAX_GRAPHS
from .diffusion.engine import EngineConfig, EngineEvent
from .diffusion.lora import LoraPolicy
from .diffusion.parallel import ParallelConfig
from .diffusion.workers import PipelineBuilder, launch_engine
from .engine.errors import GenerationFailed, RequestAborted
from .diffusion.output import DiffusionOutput
from .diffusion.params import SamplingParams
from .hub import resolve_model
from .progress import GenerateProgress

PromptLike = str | Mapping[str, Any] | SamplingParams


class GenerationError(RuntimeError):
    """A request of a `generate` call failed; `__cause__` is the original error."""


class Omni:
    """Generate images / videos (and, for multi-stage models, text) with a local checkpoint.

        with Omni("/path/to/checkpoint") as omni:      # shutdown() at the end of the block
            (out,) = omni.generate("a red cat")

    model           a checkpoint directory (diffusers: model_index.json; multi-stage:
                    config.json, e.g. BAGEL), or a Hugging Face repo id "ORG/NAME"
                    resolved as vLLM resolves one (hub.py: HF_HOME, HF_HUB_OFFLINE ...)
    revision        branch, tag or commit of a repo id (default "main")
    download_dir    the hub cache directory to use (vLLM's --download-dir)
    dtype, device   explicit; default float32 on CPU, bfloat16 on CUDA
    stage_defaults  defaults between the request and the pipeline's own
                    (SamplingParams or a mapping), e.g. from a stage config
    engine_config   token budget / max running requests of the step batcher
    parallel        multi-GPU DiT: ParallelConfig or {"cfg_degree": 2, "ulysses_degree": 1,
                    "ring_degree": 1}; world size = their product, one GPU per rank
                    (this process is rank 0; call `shutdown()` to stop the others); multi-stage
                    BAGEL takes {"cfg_degree": 2 or 3} (its CFG branches on different ranks)
    quantization    None (model dtype), "fp8" (torchao float8 DiT linears, dynamic row-wise
                    activation scales) or "fp8_static" (per-layer activation scales calibrated at
                    load on a fixed seeded request; docs/diffusion.md "fp8")
    compile         None or "regional" (torch.compile of the DiT blocks; multi-stage BAGEL: its MoT layer)
    attention_mode  multi-stage BAGEL: how its batched CFG rows attend ("auto", "padded", "per_row",
                    "varlen"; docs/bagel.md "The DiT step")
    cuda_graphs     True: the whole DiT forward replayed as one CUDA graph per shape bucket, at most
                    `cuda_graph_max` at once (docs/diffusion.md; CUDA GPUs, Qwen-Image family DiTs)
    engine_process  False (default): the engine runs in this process; True: in its own
                    process, as under `vllm serve --omni` (a multi-stage model's DiT stage too)
    loras           {name: path} LoRA adapters to serve (docs/server.md "LoRA adapters"); given
                    (even {}), requests may name adapters in `SamplingParams(lora=[(name, scale)])`
                    and `load_lora` adds more; the caller's paths are trusted
    max_loras       most adapters resident at once (LRU of the ones no request uses)
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        stage_defaults: SamplingParams | Mapping[str, Any] | None = None,
        engine_config: EngineConfig | None = None,
        force_generic: bool = False,
        stage_config: Any = None,
        ar_engine_args: Mapping[str, Any] | None = None,
        revision: str | None = None,
        download_dir: str | None = None,
        parallel: ParallelConfig | Mapping[str, int] | None = None,
        quantization: str | None = None,
        compile: str | None = None,
        attention_mode: str = "auto",
        cuda_graphs: bool = False,
        cuda_graph_max: int = DEFAULT_MAX_GRAPHS,
        engine_process: bool = False,
        loras: Mapping[str, str] | None = None,
        max_loras: int = 4,
    ) -> None:
        self.model = model
        if loras is not None:
            engine_config = dataclasses.replace(
                engine_config or EngineConfig(), lora=LoraPolicy(max_loras=max(max_loras, len(loras))),
                loras=tuple((str(k), str(v)) for k, v in loras.items()))
        #: the local directory `model` resolved to
        self.path = str(resolve_model(model, revision, download_dir))
        model = self.path
        self._ids = itertools.count()
        self._stages = None
        self._closed = False
        from .orchestrator.offline import multistage_config
        from .orchestrator.stage_config import with_dit_options

        if not isinstance(parallel, ParallelConfig):
            parallel = ParallelConfig.from_dict(parallel)
        options = DitOptions(parallel=parallel, quantization=quantization, compile=compile,
                             attention_mode=attention_mode, cuda_graphs=cuda_graphs, cuda_graph_max=cuda_graph_max)
        config = multistage_config(model, stage_config)
        if config is not None:
            if options.parallel.sp_degree > 1 or options.quantization is not None or options.cuda_graphs:
                raise ValueError("sequence parallelism (ulysses / ring), quantization and cuda_graphs: these "
                                 f"apply to diffusers DiT models, not to the multi-stage model {model} (its DiT stage "
                                 "takes cfg_degree, compile, cfg_batch and attention_mode)")
            if options.multi_stage_values():  # its diffusion stage applies them (StageOrchestrator)
                config = with_dit_options(config, {**config.final_stage.dit_options, **options.multi_stage_values()})
            # Multi-stage: AR stage on vLLM, DiT stage on a thread (or in its process); the same
            # orchestrator the server awaits, run on a private event loop.
            from .orchestrator import orchestrator_for
            from .orchestrator.offline import BackgroundLoop

            orchestrator_cls = orchestrator_for(model, config)
            self._background = BackgroundLoop()
            try:
                self._stages = self._background.run(orchestrator_cls.create(
                    model, config, ar_engine_args=dict(ar_engine_args or {}), dtype=dtype, device=device,
                    engine_process=engine_process))
            except BaseException:
                self._background.close()  # no thread left behind by a start-up that failed
                raise
            # (None with engine_process=True: the DiT stage's pipeline lives in its process)
            self.pipeline, self.engine = self._stages.pipeline, self._stages.engine
            _at_main_thread_exit(functools.partial(_shutdown_at_exit, weakref.ref(self)))
            return
        build = PipelineBuilder(model, dtype, {"force_generic": force_generic})
        if engine_process:
            from .engine.client import EngineCoreClient
            from .engine.spec import EngineSpec

            spec = EngineSpec(build, device=None if device is None else str(device), options=options,
                              engine_config=engine_config, stage_defaults=stage_defaults)
            self.client = EngineCoreClient(spec, max_queue=None)  # offline: every prompt of a call at once
            self.client.start()
            #: the in-process engine and pipeline (None with engine_process=True: they live in that process)
            self.engine = self.pipeline = None
            return
        from .engine.local import LocalEngineClient

        self.engine = launch_engine(build, device=device, options=options, engine_config=engine_config,
                                    stage_defaults=stage_defaults)
        self.pipeline = self.engine.pipeline
        self.client = LocalEngineClient(self.engine)

    # ---- LoRA adapters ---------------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> dict[str, Any]:
        """Read a LoRA adapter (diffusers format) and serve it under `name` (needs `loras=` at start)."""
        return self._lora_call("load_lora", name, str(path), True)

    def unload_lora(self, name: str) -> None:
        """Stop serving an adapter; refused (LoraBusy) while a request uses it."""
        self._lora_call("unload_lora", name)

    def list_loras(self) -> list[dict[str, Any]]:
        return self._lora_call("list_loras")

    def _lora_call(self, method: str, *args: Any) -> Any:
        self._check_open()
        if self._stages is not None:
            raise TypeError(f"{self.model}: per-request LoRA is served for diffusers DiT models only")
        if self.engine is not None:
            return getattr(self.engine, method)(*args)
        return self.client.call(method, args)

    @property
    def capabilities(self) -> Any:
        """What the loaded model makes, takes and reads (its family's `Capabilities`)."""
        if self._stages is not None:
            return self._stages.info.capabilities
        return self.client.info.capabilities

    def generate_text(self, prompts: Any, sampling_params: Any = None) -> list[Any]:
        """Multi-stage models: text2text / img2text through the AR stage (vLLM RequestOutputs)."""
        self._check_open()
        if self._stages is None or not self.capabilities.text_output:
            raise TypeError(f"{self.model} answers with {self.capabilities.output} only; it has no text output")
        items = prompts if isinstance(prompts, list) else [prompts]

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(self._stages.generate_text(p, sampling_params) for p in items))

        return self._background.run(all_of())

    def shutdown(self) -> None:
        """Stop a multi-stage model's engines, or a multi-GPU DiT's worker ranks; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stages is None:
            self.client.stop()
            return
        stages, self._stages = self._stages, None
        try:
            self._background.run(stages.shutdown())
        finally:
            self._background.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Omni({self.model!r}) was shut down; create a new one")

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_event: Callable[[EngineEvent], None] | None = None,
        use_tqdm: bool = True,
    ) -> list[DiffusionOutput]:
        """One output per prompt, in prompt order; each carries its resolved params.

        Args:
            prompts: one prompt (text, a dict of request fields, or SamplingParams) or a list.
            params: the SamplingParams of every prompt, or one per prompt.
            on_event: called with each engine event (steps, partial images, and how each request
                ended). A request with `partial_images=k` (families that stream them) sends k
                "partial" events before it finishes: `event.index` 0..k-1, `event.output.images`
                one PIL image per output, decoded from the model's x0 estimate (docs/server.md,
                "Streaming partial images").
            use_tqdm: show a progress bar over the requests and their steps (progress.py).

        Returns:
            one DiffusionOutput per prompt, in prompt order.
        """
        self._check_open()
        requests = to_requests(prompts, params)
        with GenerateProgress(len(requests), use_tqdm, on_event) as progress:
            return self._generate(requests, progress)

    def _generate(self, requests: list[SamplingParams], progress: GenerateProgress) -> list[DiffusionOutput]:
        if self._stages is not None:
            async def one(i: int, request: SamplingParams) -> DiffusionOutput:
                key = f"request-{i}"  # the bar's key; the orchestrator names the request itself
                on_partial = functools.partial(_partial_event, progress.on_event, key) if request.partial_images else None
                output = await self._stages.generate_image(request, progress.progress_for(key), on_partial=on_partial)
                progress.finished(key)
                return output

            async def all_of() -> list[DiffusionOutput]:
                return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

            return self._background.run(all_of())
        client = self.client
        resolved = [client.resolve(r) for r in requests]  # bad input raises here, before anything is queued
        ids = [f"omni-{next(self._ids)}" for _ in requests]
        # step events cross from the engine only where something shows them (a bar or `on_event`)
        progress_cbs = [functools.partial(_step_event, progress.on_event, rid) if progress.wants_events else None
                        for rid in ids]
        partial_cbs = [functools.partial(_partial_event, progress.on_event, rid) if p.partial_images else None
                       for rid, p in zip(ids, resolved)]
        handles = client.submit_many([(p, None) for p in resolved], progress_cbs, request_ids=ids,
                                     on_partial=partial_cbs)
        outputs = []
        for handle in handles:
            try:
                output = client.wait(handle)
            except RequestAborted as e:
                _final_event(progress.on_event, handle.request_id, "aborted", error=e)
                raise GenerationError(f"request {handle.request_id} ended with aborted") from e
            except GenerationFailed as e:
                _final_event(progress.on_event, handle.request_id, "error", error=e.__cause__)
                raise GenerationError(f"request {handle.request_id} ended with error") from e.__cause__
            _final_event(progress.on_event, handle.request_id, "finished", output=output)
            outputs.append(output)
        return outputs


def _step_event(on_event: Callable[[EngineEvent], None], request_id: str, step: int, total: int) -> None:
    on_event(EngineEvent("step", request_id, step, total))


def _partial_event(on_event: Callable[[EngineEvent], None], request_id: str, index: int, images: list[Any]) -> None:
    on_event(EngineEvent("partial", request_id, index=index, output=DiffusionOutput(request_id, "image", None,
                                                                                      images=list(images))))


def _final_event(on_event: Callable[[EngineEvent], None] | None, request_id: str, kind: str, **fields: Any) -> None:
    if on_event is not None:
        on_event(EngineEvent(kind, request_id, **fields))


def _shutdown_at_exit(ref: "weakref.ref[Omni]") -> None:
    omni = ref()  # a weak reference: the hook does not keep the Omni alive
    if omni is not None:
        omni.shutdown()  # a no-op when the caller already shut it down


def _at_main_thread_exit(hook: Callable[[], None]) -> None:
    """Run `hook` when the main thread ends, before the interpreter tears anything down.

    The shutdown needs what a plain `atexit` hook no longer has: by then
    concurrent.futures refuses new work ("cannot schedule new futures after
    interpreter shutdown", which the orchestrator's `asyncio.to_thread` needs) and
    vLLM's engine processes are being reaped, so its output handler raises
    EngineDeadError and AsyncLLM.__del__ a TypeError. threading's exit hooks run
    before all of that, last registered first -- the hook concurrent.futures itself
    uses. `atexit` is the fallback on an interpreter without it.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(hook)
    else:
        register(hook)


def to_requests(
    prompts: PromptLike | Sequence[PromptLike], params: SamplingParams | Sequence[SamplingParams] | None
) -> list[SamplingParams]:
    """Pair prompts with params: one SamplingParams per prompt (shared params are copied)."""
    single = isinstance(prompts, (str, Mapping, SamplingParams))
    items = [prompts] if single else list(prompts)
    if params is None or isinstance(params, SamplingParams):
        per_item = [params] * len(items)
    else:
        per_item = list(params)
        if len(per_item) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(per_item)} params")
    out = []
    for item, p in zip(items, per_item):
        base = dataclasses.replace(p, extra=dict(p.extra)) if p is not None else SamplingParams()
        if isinstance(item, SamplingParams):
            out.append(dataclasses.replace(item, extra=dict(item.extra)))
        elif isinstance(item, str):
            out.append(dataclasses.replace(base, prompt=item))
        else:
            out.append(SamplingParams.from_dict({**base.set_fields(), **dict(item)}))
    return out
