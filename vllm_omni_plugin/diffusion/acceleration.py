"""DiT acceleration options of one engine: multi-GPU layout, fp8 linears (fp8.py), compile, CUDA graphs.

These are deployment settings (same for every request), so they live here and in
the stage config / `Omni(...)` / `vllm serve --omni` flags. Step caching is a
per-request choice and lives in SamplingParams (`cache_threshold`, step_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import cuda_graphs
from .cuda_graphs import DEFAULT_MAX_GRAPHS
from .fp8 import calibrate_and_quantize_fp8_static, quantize_fp8
from .parallel import ParallelConfig

#: "fp8": torchao float8 Linears, activations scaled per row at run time; "fp8_static": one
#: activation scale per Linear, calibrated at load on a fixed seeded request (fp8.py says how)
QUANTIZATIONS = ("fp8", "fp8_static")
#: "regional": torch.compile of the repeated transformer blocks (diffusers'
#: `compile_repeated_blocks`). A "cudagraphs" mode (the same with
#: mode="reduce-overhead") was removed after its H200 run: torch's CUDA-graph
#: trees overwrite one block's output with the next block's replay (all blocks
#: are one compiled function), so the first step failed (docs/benchmarks.md). Its
#: successor is the `cuda_graphs` option: one graph of the whole forward (cuda_graphs.py).
COMPILE_MODES = ("regional",)
#: how batched rows attend to contexts of different lengths (BAGEL's DiT: docs/bagel.md, "The DiT
#: step"): "auto" picks per batch, "padded" (right-padded + mask), "per_row" (one SDPA per row),
#: "varlen" (packed back to back, a variable-length kernel)
ATTENTION_MODES = ("auto", "padded", "per_row", "varlen")
#: the options a multi-stage model's diffusion stage takes (its own pipeline applies them:
#: `apply_dit_options` hands them to a pipeline's `apply_dit_options`)
MULTI_STAGE_OPTIONS = frozenset({"compile", "cfg_batch", "cfg_degree", "attention_mode"})


@dataclass(frozen=True)
class DitOptions:
    """parallel: CFG / Ulysses / ring degrees; quantization: None (model dtype) or one of QUANTIZATIONS;
    compile: None (eager) or "regional" (see COMPILE_MODES); cfg_batch: True (default) runs
    a step's CFG branches in one forward, False one forward per branch (the pipeline's
    `batch_cfg`); attention_mode: ATTENTION_MODES (a multi-stage model's DiT only: BAGEL's);
    cuda_graphs: replay the whole transformer forward as one CUDA graph per shape bucket, at
    most `cuda_graph_max` graphs at once (diffusion/cuda_graphs.py)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: str | None = None
    compile: str | None = None
    cfg_batch: bool = True
    attention_mode: str = "auto"
    cuda_graphs: bool = False
    cuda_graph_max: int = DEFAULT_MAX_GRAPHS

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or unset, got {self.quantization!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES} or unset, got {self.compile!r}")
        if not isinstance(self.cfg_batch, bool):
            raise ValueError(f"cfg_batch must be true or false, got {self.cfg_batch!r}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        max_graphs = self.cuda_graph_max
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"cuda_graph_max must be a positive integer, got {max_graphs!r}")
        if self.cuda_graphs and self.parallel.sp_degree > 1:
            raise ValueError("cuda_graphs cannot be combined with sequence parallelism (ulysses / ring): "
                             "diffusers' all-to-all exchanges sequence lengths on the host inside the forward")

    def multi_stage_values(self) -> dict[str, Any]:
        """The MULTI_STAGE_OPTIONS that differ from the defaults, as stage-config `dit_options`."""
        values, default = self.to_dict(), DitOptions().to_dict()
        return {k: values[k] for k in sorted(MULTI_STAGE_OPTIONS) if values[k] != default[k]}

    def to_dict(self) -> dict[str, Any]:
        """The inverse of `from_dict` (every key)."""
        p = self.parallel
        return {"cfg_degree": p.cfg_degree, "ulysses_degree": p.ulysses_degree, "ring_degree": p.ring_degree,
                "quantization": self.quantization, "compile": self.compile, "cfg_batch": self.cfg_batch,
                "attention_mode": self.attention_mode, "cuda_graphs": self.cuda_graphs,
                "cuda_graph_max": self.cuda_graph_max}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "DitOptions":
        """{"cfg_degree": 2, "ulysses_degree": 1, "ring_degree": 1, "quantization": "fp8", "compile": "regional",
        "cfg_batch": true, "attention_mode": "varlen", "cuda_graphs": true, "cuda_graph_max": 8}."""
        values = dict(values or {})
        quantization = values.pop("quantization", None)
        compile_mode = values.pop("compile", None)
        cfg_batch = values.pop("cfg_batch", True)
        attention_mode = values.pop("attention_mode", "auto")
        graphs = values.pop("cuda_graphs", False)
        max_graphs = values.pop("cuda_graph_max", DEFAULT_MAX_GRAPHS)
        return cls(parallel=ParallelConfig.from_dict(values), quantization=quantization, compile=compile_mode,
                   cfg_batch=cfg_batch, attention_mode=attention_mode, cuda_graphs=graphs, cuda_graph_max=max_graphs)


def compile_dit(transformer: torch.nn.Module, mode: str, sequence_parallel: bool = False) -> None:
    """Regional torch.compile of the DiT's repeated blocks (`mode` from COMPILE_MODES).

    sequence_parallel: the attention modules stay eager and the blocks compile
    around them (no full graph). diffusers' Ulysses attention hands a process
    group to an async all-to-all that dynamo can neither put in a graph
    (`Unsupported: ProcessGroupVariable`, first request on 2x H200, torch 2.11)
    nor run under fake tensors (torch 2.13); the projections, norms and MLPs,
    where the fusions are, still compile.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    # Batch sizes and text lengths change with the engine's batches: allow the recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    if sequence_parallel:
        for module in _attention_modules(transformer):
            module.forward = torch.compiler.disable(module.forward)
    transformer.compile_repeated_blocks(fullgraph=not sequence_parallel)


def _attention_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    # diffusers' DiT blocks use either the older `Attention` class or the newer mixin.
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in transformer.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def apply_dit_options(pipeline: Any, options: DitOptions) -> None:
    """Apply the model-level options to a loaded pipeline's transformer(s): fp8 (either form), compile,
    then CUDA graphs.

    A pipeline with its own `apply_dit_options(options)` (a DiT that is not a diffusers
    `transformer`, e.g. a functional MoT) applies them itself.
    """
    own = getattr(pipeline, "apply_dit_options", None)
    if own is not None:
        own(options)
        return
    if not options.cfg_batch and hasattr(pipeline, "batch_cfg"):
        pipeline.batch_cfg = False
    if options.attention_mode != "auto":  # diffusers' DiTs attend through diffusers' processors
        raise ValueError(f"attention_mode {options.attention_mode!r}: only BAGEL's DiT stage takes attention_mode; "
                         f"{type(pipeline.pipe).__name__} attends through diffusers")
    if options.quantization is None and options.compile is None and not options.cuda_graphs:
        return
    if not dit_modules(pipeline):
        raise ValueError(f"{type(pipeline.pipe).__name__} has no DiT (`transformer`) for quantization / compile / "
                         "cuda_graphs")
    if options.cuda_graphs:  # refused before anything is changed (fp8_static's calibration included)
        devices = {next(m.parameters()).device for m in dit_modules(pipeline)}
        if any(d.type != "cuda" for d in devices):
            raise ValueError(f"cuda_graphs needs the DiT on a CUDA GPU; it is on {', '.join(map(str, devices))}")
    if options.quantization == "fp8_static":
        # before compile (calibration runs the eager bf16 DiT) and before the ranks join (each
        # rank calibrates alone on the same request: fp8.py)
        calibrate_and_quantize_fp8_static(pipeline, dit_modules(pipeline))
    for transformer in dit_modules(pipeline):
        if options.quantization == "fp8":
            quantize_fp8(transformer)
        if options.compile is not None:
            compile_dit(transformer, options.compile, sequence_parallel=options.parallel.sp_degree > 1)
    if options.cuda_graphs:
        graph_dit(pipeline, options.cuda_graph_max)


def graph_dit(pipeline: Any, max_graphs: int, capture: cuda_graphs.Capture = cuda_graphs.capture_cuda_graph) -> None:
    """Route the pipeline's DiT forward(s) through CUDA graphs (`cuda_graphs.install`).

    Only pipelines that declare `supports_cuda_graphs` (their forward was checked for host
    data and syncs; `check_capturable(transformer)` refuses or fixes what a capture cannot take).
    `capture` is the one thing the CPU tests change (cuda_graphs.replay_by_call).
    """
    if not getattr(pipeline, "supports_cuda_graphs", False):
        raise ValueError(f"cuda_graphs is not supported by {getattr(pipeline, 'family', type(pipeline).__name__)} "
                         "(its DiT forward has not been checked for host syncs)")
    for transformer in dit_modules(pipeline):
        pipeline.check_capturable(transformer)
    for transformer in dit_modules(pipeline):
        cuda_graphs.install(transformer, max_graphs, capture)


def dit_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The pipeline's DiT module(s): diffusers' `transformer` and, for two-expert pipelines, `transformer_2`."""
    pipe = pipeline.pipe
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]
