"""One layer's paged KV cache -> per-token K and V, whatever the attention backend.

The diffusion stage consumes, per layer, K and V of shape
(tokens, kv_heads, head_dim) in prompt order (`BranchKV`'s layout in
families/bagel/dit/context.py). vLLM's backends store the same numbers in
different shapes, so everything that reads a paged cache goes through
`gather_kv` and nothing else indexes a cache tensor.

vLLM 0.32 hands every backend (and every connector: `register_kv_caches`,
`save_kv_layer`) one logical per-layer view `[blocks, kv_heads, block_size, C]`
with C = 2 * head_dim; what C holds differs:

  token_packed  C = [K | V] of one token (`kv.transpose(1, 2).split(head_dim, -1)`):
                FLASH_ATTN, FLASHINFER, TRITON_ATTN, FLEX_ATTENTION. Any physical
                stride order (LBNHC token-major, LBHNC head-major) reads the same.

CPU_ATTN instead writes each (block, head) page of 2 * block_size * head_dim
elements as a key tile followed by a value tile (`do_kv_cache_update` chunks the
page in two), packed the way its kernel (`layer.isa`) reads them. From the
kernels' `reshape_and_cache` (csrc/cpu/cpu_attn_*.hpp, vLLM 0.32), with
n = block_size, D = head_dim, t = token offset in the block, h = head element:

  cpu_vec           vec, vec16, neon (fp32/fp16, and bf16 in builds without
                    ARM_BF16_SUPPORT), vxe, vsx, rvv: K transposed, K[t, h] at
                    h * n + t; V row-major, V[t, h] at t * D + h.
  cpu_amx           amx (x86 AMX tiles): elements grouped in 32-bit words of
                    p = 4 / element size (bf16: pairs). K: tokens in groups of 16,
                    K[t, h] at ((t // 16) * (D / p) + h // p) * 16 * p + (t % 16) * p + h % p.
                    V: token pairs packed into words, head elements in groups of 16,
                    V[t, h] at (h // 16) * n * 16 + (t // p) * 16 * p + (h % 16) * p + t % p.
  cpu_neon_bfmmla   neon with bf16 in builds with ARM_BF16_SUPPORT (the BFMMLA
                    kernel). K: K[t, h] at (t // 8) * 8 * D + (h // 4) * 32 +
                    ((t % 8) // 2) * 8 + (t % 2) * 4 + h % 4. V: V[t, h] at
                    (h // 2) * 2 * n + (t // 4) * 8 + (h % 2) * 4 + t % 4.

Which of these a running kernel writes is checked by writing through it
(`kv.cpu_isa.cpu_layout`); tests/test_kv_layout.py packs synthetic caches by
the formulas above, independently of the readers below, for every layout.

Older vLLM releases used separate K/V planes instead:

  kv_first         (2, blocks, block_size, kv_heads, head_dim)  vLLM <= 0.11 FlashAttention
  block_first      (blocks, 2, block_size, kv_heads, head_dim)  FlashInfer NHD
  block_first_hnd  (blocks, 2, kv_heads, block_size, head_dim)  FlashInfer HND

Every reader views the cache (no copy of it; `view`, not `reshape`, so a cache
whose memory is not in the layout's order fails loudly instead of being copied
into another order) and then copies out only the request's tokens by
(block, offset) index.
"""

from __future__ import annotations

from typing import Callable

import torch

# (cache, head_dim, block index per token, offset per token) -> K, V each (tokens, kv_heads, head_dim)
Reader = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _token_packed(kv, d, blk, off):
    k, v = kv[blk, :, off].split(d, dim=-1)  # (B, H, N, 2D)[blk, :, off] -> (T, H, 2D)
    return k, v


def _pages(kv: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's key and value tiles, each (blocks, heads, block_size * head_dim)."""
    b, h, n, c = kv.shape
    if c != 2 * d:
        raise ValueError(f"last dimension {c} is not 2 * head_dim")
    page = kv.view(b, h, 2, n * d)
    return page[:, :, 0], page[:, :, 1]


def _cpu_vec(kv, d, blk, off):
    b, h, n, _ = kv.shape
    kt, vt = _pages(kv, d)
    k = kt.view(b, h, d, n)[blk, :, :, off]  # K^T tile: (T, H, D)
    v = vt.view(b, h, n, d)[blk, :, off]
    return k, v


def _cpu_amx(kv, d, blk, off):
    b, h, n, _ = kv.shape
    p = 4 // kv.element_size()  # elements per 32-bit word
    if n % 16 or n % p or d % 16 or d % p:
        raise ValueError("the amx layout needs block_size and head_dim multiples of 16")
    kt, vt = _pages(kv, d)
    k = kt.view(b, h, n // 16, d // p, 16, p)[blk, :, off // 16, :, off % 16, :]  # (T, H, D/p, p)
    v = vt.view(b, h, d // 16, n // p, 16, p)[blk, :, :, off // p, :, off % p]  # (T, H, D/16, 16)
    return k.flatten(2), v.flatten(2)


def _cpu_neon_bfmmla(kv, d, blk, off):
    b, h, n, _ = kv.shape
    if n % 8 or d % 4:
        raise ValueError("the neon BFMMLA layout needs block_size % 8 == 0 and head_dim % 4 == 0")
    kt, vt = _pages(kv, d)
    k = kt.view(b, h, n // 8, d // 4, 4, 2, 4)[blk, :, off // 8, :, (off % 8) // 2, off % 2, :]  # (T, H, D/4, 4)
    v = vt.view(b, h, d // 2, n // 4, 2, 4)[blk, :, :, off // 4, :, off % 4]  # (T, H, D/2, 2)
    return k.flatten(2), v.flatten(2)


_READERS: dict[str, Reader] = {
    "token_packed": _token_packed,
    "cpu_vec": _cpu_vec,
    "cpu_amx": _cpu_amx,
    "cpu_neon_bfmmla": _cpu_neon_bfmmla,
    "kv_first": lambda kv, d, blk, off: (kv[0][blk, off], kv[1][blk, off]),
    "block_first": lambda kv, d, blk, off: (kv[:, 0][blk, off], kv[:, 1][blk, off]),
    "block_first_hnd": lambda kv, d, blk, off: (kv[:, 0][blk, :, off], kv[:, 1][blk, :, off]),
}
LAYOUTS: tuple[str, ...] = tuple(_READERS)

# vLLM 0.32 attention backend name (AttentionBackend.get_name()) -> layout
_BACKEND_LAYOUTS: dict[str, str] = {
    "FLASH_ATTN": "token_packed",
    "FLASHINFER": "token_packed",
    "TRITON_ATTN": "token_packed",
    "FLEX_ATTENTION": "token_packed",
}


def cpu_isa_layouts(isa: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The layouts vLLM 0.32's CPU_ATTN kernel `isa` may write for `dtype`, most likely first; () if unknown.

    neon bf16 depends on how vLLM was built (ARM_BF16_SUPPORT selects the BFMMLA
    kernel): `kv.cpu_isa.cpu_layout` tells them apart by writing through the kernel.
    """
    if isa in ("vec", "vec16", "vxe", "vsx", "rvv"):
        return ("cpu_vec",)
    if isa == "amx":
        return ("cpu_amx",)
    if isa == "neon":
        return ("cpu_neon_bfmmla", "cpu_vec") if dtype == torch.bfloat16 else ("cpu_vec",)
    return ()


def layout_for_backend(backend_name: str) -> str:
    """The layout of a vLLM 0.32 GPU backend's cache (CPU_ATTN: `kv.cpu_isa.cpu_layout`)."""
    if backend_name in _BACKEND_LAYOUTS:
        return _BACKEND_LAYOUTS[backend_name]
    raise ValueError(
        f"no KV layout known for attention backend {backend_name!r}; known: "
        f"{sorted(_BACKEND_LAYOUTS) + ['CPU_ATTN']} (add it to vllm_omni_plugin.kv.layout after "
        "checking how its forward splits the cache into K and V)"
    )


def slot_mapping(block_ids: list[int] | torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
    """Slots (block * block_size + offset) of a request's first `num_tokens` tokens."""
    blocks = torch.as_tensor(block_ids, dtype=torch.long)
    if blocks.numel() * block_size < num_tokens:
        raise ValueError(f"{blocks.numel()} blocks of {block_size} cannot hold {num_tokens} tokens")
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]


def _block_size(cache: torch.Tensor, layout: str) -> int:
    return cache.shape[3 if layout == "block_first_hnd" else 2]


def gather_kv(cache: torch.Tensor, layout: str, head_dim: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tokens at `slots`, copied out of one layer's cache.

    Args:
        cache: the layer's KV cache tensor, as the backend holds it.
        layout: one of `LAYOUTS` (`layout_for_backend`, `kv.cpu_isa.cpu_layout`).
        head_dim: the attention head size.
        slots: (tokens,) block * block_size + offset of each token, in prompt order.

    Returns:
        K and V, each (tokens, kv_heads, head_dim), contiguous.
    """
    if layout not in _READERS:
        raise ValueError(f"unknown KV layout {layout!r}; known: {LAYOUTS}")
    slots = slots.to(device=cache.device, dtype=torch.long)
    block_size = _block_size(cache, layout)
    try:
        k, v = _READERS[layout](cache, head_dim, slots // block_size, slots % block_size)
    except (RuntimeError, ValueError, IndexError) as e:  # view/split/index mismatches
        raise ValueError(f"a cache of shape {tuple(cache.shape)} is not a {layout} cache with head_dim {head_dim}: {e}") from e
    if k.dim() != 3 or k.shape != v.shape or k.shape[-1] != head_dim or k.shape[0] != slots.numel():
        raise ValueError(
            f"a {layout} cache of shape {tuple(cache.shape)} with head_dim {head_dim} does not give "
            f"(tokens, kv_heads, head_dim) K and V; got {tuple(k.shape)} / {tuple(v.shape)}"
        )
    return k.contiguous(), v.contiguous()
