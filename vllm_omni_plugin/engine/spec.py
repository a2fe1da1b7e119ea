"""What an engine core builds (`EngineSpec`) and what it tells its client about the model (`PipelineInfo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..diffusion.acceleration import DitOptions
from ..diffusion.capabilities import Capabilities
from ..diffusion.engine import DiffusionEngine, EngineConfig


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine-core process needs to build its engine; crosses the boundary by value.

    build           `build(device) -> pipeline`, a dataclass (diffusion.workers.PipelineBuilder):
                    each process (and each multi-GPU rank) loads the checkpoint itself
    device          "cuda" / "cpu" / None (CUDA when available)
    options         multi-GPU layout, fp8, compile (the ranks live under the engine process)
    engine_config   the step batcher's token budget / max running requests
    stage_defaults  defaults between the request and the pipeline's own
    stage           the stage's name in errors and on /health ("diffusion", "dit")
    torch_threads   torch's intra-op threads in the engine process; None: the starting
                    process's count (EngineCoreClient fills it in), so a caller's
                    `torch.set_num_threads` holds for its engine as it did in one process
    """

    build: Any
    device: str | None = None
    options: DitOptions = field(default_factory=DitOptions)
    engine_config: EngineConfig | None = None
    stage_defaults: Mapping[str, Any] | None = None
    stage: str = "diffusion"
    torch_threads: int | None = None

    def launch(self) -> DiffusionEngine:
        """Build the pipeline (on every rank) and return rank 0's engine (diffusion.workers.launch_engine)."""
        from ..diffusion.workers import launch_engine

        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)

        return launch_engine(self.build, device=self.device, options=self.options, engine_config=self.engine_config,
                             stage_defaults=self.stage_defaults)


@dataclass(frozen=True)
class PipelineInfo:
    """What callers read about the loaded model without holding it: the request builder,
    /v1/models and the logs need its family and declaration, nothing else.

    family          the pipeline's family name
    capabilities    its declaration (as refined by the loaded checkpoint)
    monolithic      True: it runs whole requests (progress comes from its step callback)
    stage_defaults  the engine's stage defaults (what requests resolve with)
    dtype           the dtype its loaded weights are in ("float32", "bfloat16" ...)
    """

    family: str
    capabilities: Capabilities
    monolithic: bool = False
    stage_defaults: Any = None
    dtype: str | None = None

    @classmethod
    def of(cls, engine: DiffusionEngine) -> "PipelineInfo":
        pipe = engine.pipeline
        return cls(pipe.family, pipe.capabilities, pipe.monolithic, engine.stage_defaults, pipe.dtype_name)
