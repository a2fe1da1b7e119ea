"""fp8 DiT Linears through torchao: dynamic row-wise ("fp8") and calibrated static per-tensor ("fp8_static").

"fp8": torchao `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: every call
measures each activation row's absmax and casts (extra kernels per GEMM), weights per row.

"fp8_static": torchao `Float8StaticActivationFloat8WeightConfig(act_quant_scale=..., PerTensor())`
with one activation scale per Linear fixed at load: no amax pass at run time, one cast per GEMM.
The scales come from a calibration request the engine runs once while it loads (`calibrate`):
a fixed, seeded, text-only request at the pipeline's default size, with a negative prompt where
the family reads one (so true CFG's uncond rows are seen too), `CALIBRATION_STEPS` steps of the
whole schedule (pure noise down to the last sigma, not the first steps of a long one: a DiT's
activation range moves with the timestep). Per Linear, amax = the largest |input| over every call
of that request; scale = CALIBRATION_MARGIN * amax / 448 (e4m3's largest value). The margin is
cheap because e4m3 is floating point: halving the scale's reach costs one binade at the bottom of
its ~17 (inputs below ~1e-5 * amax flush to zero), no resolution elsewhere; inputs past the reach
saturate (torchao clamps). Calibrating at load rather than on the first user request keeps a
server reproducible: the same request gives the same bytes whatever came before it. Every rank
of a multi-GPU engine calibrates on its own before the ranks are joined (same weights, same
request, same kernels: same scales; no collective).

The weights are per-tensor too: torchao's static config supports PerTensor() only (a row-wise
static scale would not fit a batch of any size, it says). Runs where `torch._scaled_mm` takes
float8 operands: CUDA with compute capability >= 8.9, and the CPU (torch >= 2.13's kernel), where
it is tested against the unquantized transformer (tests/diffusion/test_fp8_static.py).

Both configs are given `set_inductor_config=False`: torchao's default switches on inductor's
coordinate-descent autotuning process-wide (`recommended_inductor_config_setter`), which makes the
regional compile of 60 blocks benchmark every Triton kernel's tile choices, and changes the
kernels of every model compiled after it in the process (docs/benchmarks.md: the fp8 variant
that produced no step in 4 minutes).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch

from .params import SamplingParams

#: steps of the calibration request (its schedule spans the whole noise range)
CALIBRATION_STEPS = 8
CALIBRATION_SEED = 0
CALIBRATION_PROMPT = "A photograph of a busy street market at dusk, lanterns, fruit stalls, people, sharp detail"
CALIBRATION_NEGATIVE_PROMPT = "blurry, low quality"
#: headroom over the calibrated amax (see the module docstring)
CALIBRATION_MARGIN = 2.0
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The Linears both fp8 forms convert: the transformer blocks' big projections.

    Embedders, norms' modulation inputs of tiny size and the final projection stay in the model
    dtype. fp8 GEMMs need both dims multiples of 16.
    """
    return (
        isinstance(module, torch.nn.Linear)
        and (".blocks." in f".{fqn}" or "transformer_blocks." in fqn)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def _check_device(transformer: torch.nn.Module, quantization: str, cpu_ok: bool) -> None:
    device = next(transformer.parameters()).device
    if device.type == "cpu" and cpu_ok:
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "a CUDA GPU with compute capability >= 8.9" + (" or the CPU" if cpu_ok else "")
        raise ValueError(f"quantization={quantization!r} needs {where}; the DiT is on {device}")


def _torchao(quantization: str) -> Any:
    try:
        import torchao.quantization
    except ImportError as exc:
        raise ValueError(f"quantization={quantization!r} needs an importable torchao matching this torch ({exc})") from exc
    return torchao.quantization


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Swap the DiT blocks' Linear layers for torchao float8 (dynamic per-row activations, per-row weights).

    torchao's `Float8DynamicActivationFloat8WeightConfig` is the maintained path (the one
    diffusers documents); it runs on CUDA devices with fp8 tensor cores (compute capability
    >= 8.9: Ada, Hopper, Blackwell).

    Returns:
        the number of Linear layers converted.
    """
    _check_device(transformer, "fp8", cpu_ok=False)
    ao = _torchao("fp8")
    chosen = [name for name, m in transformer.named_modules() if fp8_linear(m, name)]
    config = ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow(), set_inductor_config=False)
    ao.quantize_(transformer, config, filter_fn=fp8_linear)
    move_biases_after_gemm(transformer, chosen)
    return len(chosen)


def move_biases_after_gemm(transformer: torch.nn.Module, names: list[str]) -> None:
    """Wrap each named Linear that has a bias in `_BiasAfterGemm` (see there for why)."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        linear = transformer.get_submodule(name)
        if linear.bias is not None:
            setattr(transformer.get_submodule(parent) if parent else transformer, attr, _BiasAfterGemm(linear))


class _BiasAfterGemm(torch.nn.Module):
    """An fp8 Linear whose bias is added after the GEMM, in the model dtype.

    Row-wise scaled fp8 GEMMs with a fused bias are not supported by cuBLASLt in
    torch 2.10-2.11 + CUDA 13 (`CUBLAS_STATUS_NOT_SUPPORTED`, measured on an
    H200; pytorch PR 190538); without the bias they take the CUTLASS kernel.
    Under torch.compile the add fuses into the next elementwise kernel.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.bias = linear.bias
        linear.bias = None
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias


# ---- fp8_static: calibration --------------------------------------------------------------

def static_fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The Linears fp8_static converts: `fp8_linear`, less 128 x 128 weights.

    torchao 0.18 reads a per-tensor-scaled weight whose shape is exactly 128 x 128 as 128x128
    block scaling (`_is_128_128_scaled` looks at the block size only) and asserts in the GEMM;
    such a layer (none at Qwen-Image's real dims, most attention projections of the tiny test
    checkpoint) stays in the model dtype.
    """
    return fp8_linear(module, fqn) and tuple(module.weight.shape) != (128, 128)


@contextmanager
def observe_input_amax(transformer: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, record per `static_fp8_linear` the largest |input| of every call (float32, on its device,
    shaped (1,) * the input's ndim: torchao wants the scale's ndim to be the input's).

    The max is taken on the device (no host sync per call) and is exact, so the same inputs give
    the same amax bit for bit whatever the order of the calls.
    """
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            seen = x.abs().amax(dim=tuple(range(x.ndim)), keepdim=True).float()
            amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in transformer.named_modules()
               if static_fp8_linear(m, name)]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


def static_scales(amax: dict[str, torch.Tensor], margin: float = CALIBRATION_MARGIN) -> dict[str, torch.Tensor]:
    """scale = margin * amax / 448 per Linear (floored so an all-zero input cannot divide by zero)."""
    tiny = torch.finfo(torch.float32).tiny
    return {name: (a * margin / FP8_MAX).clamp_min(tiny) for name, a in amax.items()}


def calibration_request(pipeline: Any) -> SamplingParams:
    """The fixed calibration request (see the module docstring): what `calibrate` runs."""
    if pipeline.capabilities.input_images[0] > 0:
        raise ValueError(f"quantization='fp8_static' calibrates on a text-only request; {pipeline.family} needs "
                         "input images (use quantization='fp8')")
    negative = {"negative_prompt": CALIBRATION_NEGATIVE_PROMPT} if "negative_prompt" in pipeline.capabilities.fields \
        else {}
    return SamplingParams(prompt=CALIBRATION_PROMPT, seed=CALIBRATION_SEED, num_inference_steps=CALIBRATION_STEPS,
                          output_type="latent", **negative)


def calibrate(pipeline: Any, transformers: list[torch.nn.Module],
              request: SamplingParams | None = None) -> list[dict[str, torch.Tensor]]:
    """Run `request` (default: `calibration_request`) through `pipeline`; per transformer,
    {Linear fqn: input amax}. The engine always runs the default; tests pass smaller ones.

    A Linear the request never called (e.g. an expert that no calibration step reached) has no
    entry and stays in the model dtype.
    """
    with ExitStack() as stack, torch.no_grad():
        amaxes = [stack.enter_context(observe_input_amax(t)) for t in transformers]
        pipeline.generate(request if request is not None else calibration_request(pipeline))
    return amaxes


def quantize_fp8_static(transformer: torch.nn.Module, scales: dict[str, torch.Tensor]) -> int:
    """Swap each Linear named in `scales` for torchao's static fp8 form (per-tensor weight, that activation scale).

    The bias stays fused in the GEMM: the cuBLASLt refusal `_BiasAfterGemm` works around is of
    row-wise scaling; `bench_dit_scaling.py --suite probe` shows whether this torch + CUDA takes
    "_scaled_mm tensorwise +bias".

    Returns:
        the number of Linear layers converted.
    """
    _check_device(transformer, "fp8_static", cpu_ok=True)
    ao = _torchao("fp8_static")

    def config(scale: torch.Tensor):
        return ao.Float8StaticActivationFloat8WeightConfig(act_quant_scale=scale, granularity=ao.PerTensor(),
                                                           set_inductor_config=False)

    ao.quantize_(transformer, ao.FqnToConfig({name: config(s) for name, s in scales.items()}), filter_fn=None)
    return len(scales)


def calibrate_and_quantize_fp8_static(pipeline: Any, transformers: list[torch.nn.Module]) -> list[int]:
    """fp8_static on a loaded pipeline: device check, calibration request, then the swap, per transformer."""
    for t in transformers:
        _check_device(t, "fp8_static", cpu_ok=True)
    _torchao("fp8_static")
    return [quantize_fp8_static(t, static_scales(a)) for t, a in zip(transformers, calibrate(pipeline, transformers))]
