"""Seeded random weights, created directly on the target device and dtype (the families'
checkpoint factories' shared helper: `random_model`, `stream_seed`, `SAVE_DTYPE`).

`random_model(factory, seed=..., component=..., dtype=..., device=...)` builds a
module with its parameters on the meta device (no memory, no default init: a
20B DiT costs nothing on the host), then allocates each parameter where it will
live and fills it from a generator seeded by (seed, component, parameter name).
The values thus depend only on those, not on construction order, and the same
(seed, CPU) gives the same bytes in every process. `component` (the pipeline
folder name) keeps two same-shaped models, e.g. Wan's two experts, apart.

Init scale: normal(0, 1/fan_in) for matrices, convolutions and embeddings
(activations keep roughly unit scale through pre-norm residual stacks, so a
60-layer DiT stays finite in bf16), ones/zeros for norm scales and biases.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# dtype of the files `build` writes: tiny runs on CPUs in float32; full is bf16 like the released weights.
SAVE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}


@contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device; buffers stay real (rotary tables etc. are computed at init)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def stream_seed(seed: int, name: str) -> int:
    """The generator seed of one named tensor of a checkpoint seeded `seed` (63 bits of sha256)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _fill(shape: torch.Size, name: str, in_norm: bool, seed: int, device: torch.device) -> torch.Tensor:
    """float32 values for one parameter (shape only on the meta device, to inspect `full` without memory)."""
    if device.type == "meta":
        return torch.empty(shape, device=device)
    if in_norm or len(shape) <= 1:
        # Norm scales (weight/gamma) -> 1, biases and norm shifts -> 0.
        value = 0.0 if name.rsplit(".", 1)[-1] == "bias" else 1.0
        return torch.full(shape, value, device=device)
    gen = torch.Generator(device=device).manual_seed(stream_seed(seed, name))
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen, device=device).mul_(1.0 / math.sqrt(fan_in))


def random_model(
    factory: Callable[[], M],
    *,
    seed: int,
    component: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> M:
    """`factory()` with seeded random parameters on `device` in `dtype`.

    Modules named in the model's `_keep_in_fp32_modules` stay float32, as the
    diffusers/transformers loaders keep them.
    """
    device = torch.device(device)
    with _parameters_on_meta():
        model = factory()
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    done: dict[int, nn.Parameter] = {}  # tied parameters (one tensor, several names) stay tied
    for mod_name, module in model.named_modules():
        in_norm = "norm" in type(module).__name__.lower()
        for p_name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                full_name = f"{mod_name}.{p_name}" if mod_name else p_name
                fp32 = any(part in keep_fp32 for part in full_name.split("."))
                values = _fill(param.shape, f"{component}/{full_name}", in_norm, seed, device)
                done[id(param)] = nn.Parameter(values.to(torch.float32 if fp32 else dtype), requires_grad=False)
            module._parameters[p_name] = done[id(param)]
    return model.to(device).eval()  # moves the buffers; parameters are there already
