"""Offline API: `Omni(model=PATH).generate(prompts, params)`.

Single-stage diffusion models run inline: one diffusion engine in this process,
every prompt of a `generate` call submitted at once so their steps batch.
Multi-stage models (BAGEL: AR stage in vLLM -> DiT stage) run through the
orchestrator (orchestrator/bagel.py), chosen from the checkpoint's
architecture by its stage config; only that path imports vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import torch

from .diffusion.acceleration import DitOptions
from .diffusion.engine import EngineConfig, EngineEvent
from .diffusion.parallel import ParallelConfig
from .diffusion.workers import PipelineBuilder, launch_engine
from .diffusion.output import DiffusionOutput
from .diffusion.params import SamplingParams

PromptLike = str | Mapping[str, Any] | SamplingParams


class GenerationError(RuntimeError):
    """A request of a `generate` call failed; `__cause__` is the original error."""


class Omni:
    """Generate images / videos with a diffusers-format model directory.

    model           path of a diffusers checkpoint (model_index.json)
    dtype, device   explicit; default float32 on CPU, bfloat16 on CUDA
    stage_defaults  defaults between the request and the pipeline's own
                    (SamplingParams or a mapping), e.g. from a stage config
    engine_config   token budget / max running requests of the step batcher
    parallel        multi-GPU DiT: ParallelConfig or {"cfg_degree": 2, "ulysses_degree": 1,
                    "ring_degree": 1}; world size = their product, one GPU per rank
                    (this process is rank 0; call `shutdown()` to stop the others)
    quantization    None (model dtype) or "fp8" (torchao float8 DiT linears)
    compile         None, "regional" or "cudagraphs" (torch.compile of the DiT blocks)
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
        parallel: ParallelConfig | Mapping[str, int] | None = None,
        quantization: str | None = None,
        compile: str | None = None,
    ) -> None:
        self.model = model
        self._ids = itertools.count()
        self._stages = None
        from .orchestrator.offline import multistage_config

        if not isinstance(parallel, ParallelConfig):
            parallel = ParallelConfig.from_dict(parallel)
        options = DitOptions(parallel=parallel, quantization=quantization, compile=compile)
        config = multistage_config(model, stage_config)
        if config is not None:
            if options != DitOptions():
                raise ValueError("parallel / quantization / compile apply to diffusers DiT models, not to "
                                 f"the multi-stage model {model}")
            # Multi-stage (BAGEL): AR stage on vLLM, DiT stage inline; the same
            # orchestrator the server awaits, run on a private event loop.
            from .orchestrator.bagel import BagelOrchestrator
            from .orchestrator.offline import BackgroundLoop

            self._background = BackgroundLoop()
            self._stages = self._background.run(BagelOrchestrator.create(
                model, config, ar_engine_args=dict(ar_engine_args or {}), dtype=dtype, device=device))
            self.pipeline, self.engine = self._stages.pipeline, self._stages.engine
            return
        build = PipelineBuilder(model, dtype, {"force_generic": force_generic})
        self.engine = launch_engine(build, device=device, options=options, engine_config=engine_config,
                                    stage_defaults=stage_defaults)
        self.pipeline = self.engine.pipeline

    def generate_text(self, prompts: Any, sampling_params: Any = None) -> list[Any]:
        """Multi-stage models: text2text / img2text through the AR stage (vLLM RequestOutputs)."""
        if self._stages is None:
            raise TypeError(f"{self.model} is a single-stage diffusion model; it has no text output")
        items = prompts if isinstance(prompts, list) else [prompts]

        async def all_of() -> list[Any]:
            return await asyncio.gather(*(self._stages.generate_text(p, sampling_params) for p in items))

        return self._background.run(all_of())

    def shutdown(self) -> None:
        """Stop a multi-stage model's engines, or a multi-GPU DiT's worker ranks."""
        if self._stages is None:
            self.engine.close()
        else:
            self._background.run(self._stages.shutdown())
            self._background.close()
            self._stages = None

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_event: Callable[[EngineEvent], None] | None = None,
    ) -> list[DiffusionOutput]:
        """One output per prompt, in prompt order; each carries its resolved params."""
        requests = to_requests(prompts, params)
        if self._stages is not None:
            async def all_of() -> list[DiffusionOutput]:
                return await asyncio.gather(*(self._stages.generate_image(r) for r in requests))

            return self._background.run(all_of())
        ids = [f"omni-{next(self._ids)}" for _ in requests]
        for rid, request in zip(ids, requests):
            self.engine.add_request(rid, request)
        final = self.engine.run(on_event)
        outputs = []
        for rid in ids:
            event = final[rid]
            if event.kind != "finished":
                raise GenerationError(f"request {rid} ended with {event.kind}") from event.error
            outputs.append(event.output)
        return outputs


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
