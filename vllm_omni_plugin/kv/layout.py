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
  cpu_vec       CPU_ATTN with its "vec"/"vec16" kernels: each (block, head) page
                is the keys *transposed*, (head_dim, block_size), then the values,
                (block_size, head_dim) -- the C++ kernel's format, checked by
                writing through `cpu_attn_reshape_and_cache` (tests/test_kv_layout.py).
                Other CPU ISAs (amx, neon, ...) pack keys differently and are refused.

Older vLLM releases used separate K/V planes instead:

  kv_first         (2, blocks, block_size, kv_heads, head_dim)  vLLM <= 0.11 FlashAttention
  block_first      (blocks, 2, block_size, kv_heads, head_dim)  FlashInfer NHD
  block_first_hnd  (blocks, 2, kv_heads, block_size, head_dim)  FlashInfer HND

Every layout is turned into two views (no copy of the cache) of shape
(blocks, block_size, kv_heads, head_dim); gathering by slot
(block * block_size + offset) then copies out only the request's tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

Split = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _token_packed(kv: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = kv.transpose(1, 2).split(d, dim=-1)  # (B, H, N, 2D) -> 2 x (B, N, H, D)
    return k, v


def _cpu_vec(kv: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, _ = kv.shape
    # `view` (not reshape): a cache whose pages are not contiguous must fail
    # loudly rather than be silently copied into another order.
    page = kv.view(b, h, 2, n * d)
    k = page[:, :, 0].view(b, h, d, n).permute(0, 3, 1, 2)  # K^T page -> (B, N, H, D)
    v = page[:, :, 1].view(b, h, n, d).transpose(1, 2)
    return k, v


_SPLIT: dict[str, Split] = {
    "token_packed": _token_packed,
    "cpu_vec": _cpu_vec,
    "kv_first": lambda kv, d: (kv[0], kv[1]),
    "block_first": lambda kv, d: (kv[:, 0], kv[:, 1]),
    "block_first_hnd": lambda kv, d: (kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)),
}
LAYOUTS: tuple[str, ...] = tuple(_SPLIT)

# vLLM 0.32 attention backend name (AttentionBackend.get_name()) -> layout
_BACKEND_LAYOUTS: dict[str, str] = {
    "FLASH_ATTN": "token_packed",
    "FLASHINFER": "token_packed",
    "TRITON_ATTN": "token_packed",
    "FLEX_ATTENTION": "token_packed",
}
_CPU_ISA_LAYOUTS: dict[str, str] = {"vec": "cpu_vec", "vec16": "cpu_vec"}


def layout_for_backend(backend_name: str, cpu_isa: str | None = None) -> str:
    """The layout of a vLLM 0.32 backend's cache; CPU_ATTN also needs its kernel ISA (`layer.isa`)."""
    if backend_name == "CPU_ATTN":
        if cpu_isa in _CPU_ISA_LAYOUTS:
            return _CPU_ISA_LAYOUTS[cpu_isa]
        raise ValueError(
            f"CPU_ATTN with kernel ISA {cpu_isa!r}: its key packing is not known to "
            f"vllm_omni_plugin.kv.layout (known: {sorted(_CPU_ISA_LAYOUTS)}); check it with the "
            "cpu_attn_reshape_and_cache probe in tests/test_kv_layout.py and add it"
        )
    if backend_name in _BACKEND_LAYOUTS:
        return _BACKEND_LAYOUTS[backend_name]
    raise ValueError(
        f"no KV layout known for attention backend {backend_name!r}; known: "
        f"{sorted(_BACKEND_LAYOUTS) + ['CPU_ATTN']} (add it to vllm_omni_plugin.kv.layout after "
        "checking how its forward splits the cache into K and V)"
    )


def split_kv(cache: torch.Tensor, layout: str, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views of one layer's cache, each (blocks, block_size, kv_heads, head_dim)."""
    if layout not in _SPLIT:
        raise ValueError(f"unknown KV layout {layout!r}; known: {LAYOUTS}")
    try:
        k, v = _SPLIT[layout](cache, head_dim)
    except (RuntimeError, ValueError) as e:  # view/split/unpack mismatches
        raise ValueError(f"a cache of shape {tuple(cache.shape)} is not a {layout} cache with head_dim {head_dim}: {e}") from e
    if k.dim() != 4 or k.shape != v.shape or k.shape[-1] != head_dim:
        raise ValueError(
            f"a {layout} cache of shape {tuple(cache.shape)} with head_dim {head_dim} does not give "
            f"(blocks, block_size, kv_heads, head_dim) K and V; got {tuple(k.shape)} / {tuple(v.shape)}"
        )
    return k, v


def slot_mapping(block_ids: list[int] | torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
    """Slots (block * block_size + offset) of a request's first `num_tokens` tokens."""
    blocks = torch.as_tensor(block_ids, dtype=torch.long)
    if blocks.numel() * block_size < num_tokens:
        raise ValueError(f"{blocks.numel()} blocks of {block_size} cannot hold {num_tokens} tokens")
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]


def gather_kv(cache: torch.Tensor, layout: str, head_dim: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tokens at `slots`, each (len(slots), kv_heads, head_dim), copied out of the cache."""
    k, v = split_kv(cache, layout, head_dim)
    slots = slots.to(device=cache.device, dtype=torch.long)
    block, offset = slots // k.shape[1], slots % k.shape[1]
    return k[block, offset].contiguous(), v[block, offset].contiguous()
