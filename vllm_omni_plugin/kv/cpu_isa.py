"""Which CPU attention kernel a layer runs, which KV layout it writes, and a known one when needed.

vLLM 0.32's CPU_ATTN backend picks a kernel ISA per KV-cache group
(`cpu_attn._get_attn_isa`: amx for bf16 on AMX CPUs, neon on ARM, vxe / vsx /
rvv on s390x / POWER / RISC-V, else vec, or vec16 for head sizes that are
multiples of 16 but not 32). Each kernel packs the paged cache its own way
(`kv.layout`). `cpu_layout` does not trust a table alone: it writes known keys
and values through the kernel itself (`cpu_attn_reshape_and_cache`, the op
`do_kv_cache_update` runs) into a scratch cache of the layer's shape and
returns the layout that reads them back exactly -- so a build difference
(neon bf16 with or without ARM_BF16_SUPPORT) or a kernel that changed its
packing is found at start-up, not as a wrong image.

`known_layout_isa` is what the patch `cpu_attn_known_kv_layout` calls for
engines that hand their KV over: the ISA vLLM picked when its layout is known,
else the portable vec / vec16 kernel (compiled into every CPU build).
"""

from __future__ import annotations

import functools
import platform

import torch

from .layout import cpu_isa_layouts, gather_kv, slot_mapping

# The portable kernels, in vLLM's order of preference, with the block-size
# multiple each needs (BlockSizeAlignment in csrc/cpu/cpu_attn_vec*.hpp).
PORTABLE_ISAS: tuple[tuple[str, int], ...] = (("vec", 32), ("vec16", 16))


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (/proc/cpuinfo), lower case; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features", "isa"):
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return frozenset()


def cpu_lacks(isa: str) -> str | None:
    """Why this CPU cannot run vLLM's `isa` attention kernel, or None if it can.

    Args:
        isa: a CPU_ATTN kernel name (vec, vec16, amx, neon, vxe, vsx, rvv).

    Returns:
        None when the CPU has what the kernel needs (the vLLM build may still
        lack the kernel: `cpu_layout` returns None then), else the reason.
    """
    machine = platform.machine().lower()
    if isa in ("vec", "vec16"):
        return None
    if isa == "amx":
        if not torch.cpu._is_amx_tile_supported():
            return "this CPU has no AMX tiles (amx_tile / amx_bf16 flags)"
        return None
    needs = {"neon": ("aarch64", "arm64"), "vxe": ("s390x",), "vsx": ("ppc64le", "ppc64"), "rvv": ("riscv64",)}
    if isa not in needs:
        return f"{isa!r} is not a vLLM 0.32 CPU attention kernel"
    if machine not in needs[isa]:
        return f"the {isa} kernel is for {'/'.join(needs[isa])} CPUs; this one is {machine}"
    if isa == "rvv" and not torch.ops._C.cpu_attn_has_isa("rvv"):
        return "this vLLM build has no rvv kernel (cpu_attn_has_isa('rvv') is False)"
    return None


def write_through_kernel(isa: str, dtype: torch.dtype, head_dim: int, block_size: int,
                         heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scratch cache written by vLLM's own `cpu_attn_reshape_and_cache` for `isa`.

    Returns:
        (cache, keys, values, slots): the CPU_ATTN-shaped cache (3 blocks), the
        (tokens, heads, head_dim) keys and values written, and their slots (one
        full block and part of another, out of order, as a real request's are).
        RuntimeError from vLLM when its build has no such kernel or head size.
    """
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(seed)
    n = block_size + block_size // 2 + 1
    k = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    slots = slot_mapping([2, 0], block_size, n)
    cache = torch.zeros(3, heads, block_size, 2 * head_dim, dtype=dtype)  # CPU_ATTN's [B, H, N, 2D]
    # exactly CPUAttentionBackendImpl.do_kv_cache_update's views
    key_cache, value_cache = cache.view(3, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    return cache, k, v, slots


@functools.lru_cache(maxsize=None)
def cpu_layout(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """The `kv.layout` layout vLLM's `isa` kernel writes here, found by writing through it; None if unknown.

    Args:
        isa, dtype, head_dim, block_size: the layer's kernel ISA (`layer.isa`),
            cache dtype, head size and block size.

    Returns:
        A layout name, or None when no known layout reads back what the kernel
        wrote, or when the kernel is not in this build / not for this head size.
    """
    candidates = cpu_isa_layouts(isa, dtype)
    if not candidates or cpu_lacks(isa) is not None:
        return None
    try:
        cache, k, v, slots = write_through_kernel(isa, dtype, head_dim, block_size)
    except RuntimeError:
        return None
    for layout in candidates:
        try:
            gk, gv = gather_kv(cache, layout, head_dim, slots)
        except ValueError:
            continue
        if torch.equal(gk, k) and torch.equal(gv, v):
            return layout
    return None


def known_layout_isa(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    """`isa` if its KV layout is known here, else the first portable kernel whose layout is.

    Raises:
        ValueError: no kernel for this head size / block size has a known layout.
    """
    if cpu_layout(isa, dtype, head_dim, block_size) is not None:
        return isa
    for portable, multiple in PORTABLE_ISAS:
        if block_size % multiple == 0 and cpu_layout(portable, dtype, head_dim, block_size) is not None:
            return portable
    raise ValueError(
        f"no CPU attention kernel with a known KV layout for head_dim {head_dim}, block_size {block_size}, "
        f"{dtype} (vLLM picked {isa!r}; tried {[p for p, _ in PORTABLE_ISAS]})"
    )
