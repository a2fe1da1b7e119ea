"""DiT acceleration options of one engine: multi-GPU layout and fp8 linears.

These are deployment settings (same for every request), so they live here and in
the stage config / `Omni(...)` / `vllm serve --omni` flags. Step caching is a
per-request choice and lives in SamplingParams (`cache_threshold`, step_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .parallel import ParallelConfig

QUANTIZATIONS = ("fp8",)
#: "regional": torch.compile of the repeated transformer blocks (diffusers'
#: `compile_repeated_blocks`, fullgraph); "cudagraphs": the same with
#: mode="reduce-overhead", so each block replays as a CUDA graph (no per-kernel
#: launch cost on the host; for steps whose shapes repeat).
COMPILE_MODES = ("regional", "cudagraphs")


@dataclass(frozen=True)
class DitOptions:
    """parallel: CFG / Ulysses / ring degrees; quantization: None (model dtype) or "fp8";
    compile: None (eager), "regional" or "cudagraphs" (see COMPILE_MODES)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: str | None = None
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or unset, got {self.quantization!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES} or unset, got {self.compile!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "DitOptions":
        """{"cfg_degree": 2, "ulysses_degree": 1, "ring_degree": 1, "quantization": "fp8", "compile": "regional"}."""
        values = dict(values or {})
        quantization = values.pop("quantization", None)
        compile_mode = values.pop("compile", None)
        return cls(parallel=ParallelConfig.from_dict(values), quantization=quantization, compile=compile_mode)


def _fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    # Only the transformer blocks' big projections: embedders, norms' modulation
    # inputs of tiny size and the final projection stay in the model dtype. fp8
    # GEMMs need both dims multiples of 16.
    return (
        isinstance(module, torch.nn.Linear)
        and (".blocks." in f".{fqn}" or "transformer_blocks." in fqn)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Swap the DiT blocks' Linear layers for torchao float8 (dynamic per-row activations, per-row weights).

    torchao's `Float8DynamicActivationFloat8WeightConfig` is the maintained path
    (the one diffusers documents); it runs on CUDA devices with fp8 tensor cores
    (compute capability >= 8.9: Ada, Hopper, Blackwell).

    Returns:
        the number of Linear layers converted.
    """
    device = next(transformer.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"quantization='fp8' needs a CUDA GPU with compute capability >= 8.9; the DiT is on {device}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ValueError(f"quantization='fp8' needs an importable torchao matching this torch ({exc})") from exc
    count = sum(1 for name, m in transformer.named_modules() if _fp8_linear(m, name))
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_linear)
    return count


def compile_dit(transformer: torch.nn.Module, mode: str) -> None:
    """Regional torch.compile of the DiT's repeated blocks (`mode` from COMPILE_MODES)."""
    # Batch sizes and text lengths change with the engine's batches: allow the recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    kwargs = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
    transformer.compile_repeated_blocks(fullgraph=True, **kwargs)


def apply_dit_options(pipeline: Any, options: DitOptions) -> None:
    """Apply the model-level options to a loaded pipeline's transformer(s): fp8, then compile."""
    if options.quantization is None and options.compile is None:
        return
    if not dit_modules(pipeline):
        raise ValueError(f"{type(pipeline.pipe).__name__} has no DiT (`transformer`) for quantization / compile")
    for transformer in dit_modules(pipeline):
        if options.quantization == "fp8":
            quantize_fp8(transformer)
        if options.compile is not None:
            compile_dit(transformer, options.compile)


def dit_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The pipeline's DiT module(s): `transformer` and, for Wan2.2 A14B, `transformer_2`."""
    pipe = pipeline.pipe
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]
