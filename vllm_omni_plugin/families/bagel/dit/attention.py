"""How the rows of a batched DiT step attend to their contexts of different lengths.

BAGEL's attention_mode (families/bagel/pipeline.py, docs/bagel.md "The DiT step"): "padded"
(`attention` over right-padded contexts with a boolean mask), "per_row" (`attention_per_row`: one
SDPA per row over its own context) and "varlen" (`PackedContext`), below.

attention_mode "varlen": row r's keys are its own context (T_r tokens, from the AR stage) followed
by its own image-block tokens (N, the same in every row). Every layer keeps ONE buffer of all rows'
keys back to back,

    [context_0 | image_0 | context_1 | image_1 | ...]     cu_seqlens_k = 0, T_0+N, T_0+T_1+2N, ...

filled with the contexts once per batch layout (`pack_context`, as the padded layout stacks them);
each step writes only the image tokens' new K/V into their slots (one `index_copy_` per layer,
indices fixed with the layout) and calls a variable-length attention kernel over the packed
queries (cu_seqlens_q = 0, N, 2N, ...): no padding, no mask, no context copied per step, no value
read back to the host (the offsets are known on the host when the layout is built).

The kernel (`varlen_kernel`): on CUDA in float16 / bfloat16, PyTorch's own
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; its flash-attention forward, which takes
the packed layout and grouped-query heads as they are). vLLM's bundled flash-attn is not used: the
DiT stage must import and run without vLLM (ARCHITECTURE.md principle 3; the GPU benchmark box has
none). Everywhere else (CPU, float32 on CUDA, a torch without varlen_attn) `segment_attention`:
one SDPA per row over the same packed buffers and the same offsets -- the flash kernel is CUDA-only
and half-precision only, and FlexAttention with a document mask, which does run on CPU, was slower
than SDPA per row there (eager it materialises all scores; compiled, a compile per shape and still
slower; either way through dynamo: docs/bagel.md, "The DiT step").
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .context import BranchKV


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, N, heads, d), k/v (B, S, kv_heads, d) -> (B, N, heads*d). Grouped-query: kv head j serves
    the consecutive query heads j*g .. j*g+g-1 (Qwen2's repeat_kv)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def attention_per_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Row r's queries q[r] attend to its own context past[r] (T_r, kv_heads, d) then to k[r] / v[r]:
    no padding, no mask (attention_mode "per_row")."""
    rows = [attention(q[r:r + 1], torch.cat([pk, k[r]])[None], torch.cat([pv, v[r]])[None], None)
            for r, (pk, pv) in enumerate(past)]
    return torch.cat(rows)


#: (q (total_q, heads, d), k, v (total_k, kv_heads, d), packed) -> (total_q, heads, d)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "PackedContext"], torch.Tensor]


@dataclass(frozen=True)
class PackedContext:
    """One batch layout's rows packed back to back (module docstring).

    keys[i], values[i]: layer i's buffer (total_k, kv_heads, d): each row's context, then slots
        for its image tokens' own K/V (rewritten every step).
    slots: (rows * n_query,) the buffer rows those image tokens go to, in (row, token) order.
    cu_q, cu_k: int32 (rows + 1,) cumulative query / key lengths on the device (the CUDA kernel's);
    offsets_q, offsets_k: the same on the host (max lengths, the per-row kernel's slices).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    offsets_q: tuple[int, ...]
    offsets_k: tuple[int, ...]
    kernel: Kernel

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in itertools.pairwise(self.offsets_q))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in itertools.pairwise(self.offsets_k))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (rows, N, heads, d), the image tokens' own k / v (rows, N, kv_heads, d) of `layer`
        -> (rows, N, heads * d)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(0, self.slots, k.flatten(0, 1))
        values.index_copy_(0, self.slots, v.flatten(0, 1))
        out = self.kernel(q.flatten(0, 1), keys, values, self)
        return out.view(*q.shape[:2], -1)


def pack_context(rows: Sequence[BranchKV], n_query: int, layers: int, kernel: Kernel) -> PackedContext:
    """Pack the rows' context KV (each row followed by n_query free slots), once per batch layout."""
    first = rows[0].keys[0]
    device = first.device
    offsets_k = tuple(itertools.accumulate((b.num_tokens + n_query for b in rows), initial=0))
    offsets_q = tuple(range(0, (len(rows) + 1) * n_query, n_query))
    slots = torch.tensor([i for b, end in zip(rows, offsets_k[1:]) for i in range(end - n_query, end)],
                         dtype=torch.long, device=device)
    free = first.new_zeros(n_query, *first.shape[1:])

    def packed(side: str, i: int) -> torch.Tensor:
        return torch.cat([t for b in rows for t in (getattr(b, side)[i], free)])

    return PackedContext(
        keys=[packed("keys", i) for i in range(layers)],
        values=[packed("values", i) for i in range(layers)],
        slots=slots,
        cu_q=torch.tensor(offsets_q, dtype=torch.int32, device=device),
        cu_k=torch.tensor(offsets_k, dtype=torch.int32, device=device),
        offsets_q=offsets_q,
        offsets_k=offsets_k,
        kernel=kernel,
    )


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedContext) -> torch.Tensor:
    """The packed layout attended one row at a time with `attention` (the kernel off CUDA half
    precision). Its repeat of the grouped K/V heads stays: on CPU SDPA's own enable_gqa over these
    strided slices ran 1.6-2x slower (docs/bagel.md, "The DiT step")."""
    rows = [attention(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], None)[0]
            for (qa, qb), (ka, kb) in zip(itertools.pairwise(packed.offsets_q), itertools.pairwise(packed.offsets_k))]
    return torch.cat(rows).unflatten(-1, (q.shape[1], -1))


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedContext) -> torch.Tensor:
    """torch's varlen_attn (flash-attention forward) over the packed layout; non-causal by default in
    every torch that has it (2.10's `is_causal=False`, 2.11+'s `window_size=(-1, -1)`)."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] and _takes_enable_gqa() else {}
    return varlen_attn(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, **gqa)


def _takes_enable_gqa() -> bool:
    # torch 2.13 checks the head counts unless enable_gqa=True; the first releases have no such
    # argument and hand grouped-query K/V to flash-attention, which takes them natively.
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def has_flash_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel for packed rows on this device and dtype (module docstring)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and has_flash_varlen():
        return flash_varlen_attention
    return segment_attention
