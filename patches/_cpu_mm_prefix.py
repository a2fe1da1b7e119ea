"""mm-prefix (bidirectional image) attention for vLLM's CPU attention backend.

Shared by the patches `cpu_mm_prefix_metadata` (plans the work once per step
and KV-cache group) and `cpu_mm_prefix_attention` (does it in every layer).

vLLM's GPU model runner, which the CPU runner inherits, already hands every
attention metadata builder `CommonAttentionMetadata.mm_req_doc_ranges`: per
request, the inclusive (start, end) prompt positions of each image. The CPU
backend ignores them, so its kernel attends causally everywhere. Only query
tokens *inside* an image span and before its last token are wrong under
causal attention (they miss the later tokens of their own image): text before
an image never sees it, text after it sees all of it causally, and decode
tokens come after every image. So the fix leaves the kernel's causal result
in place and recomputes just those rows, with the same kernel, as an extra
non-causal batch: one kernel "sequence" per (request, image span) whose
queries are the span's scheduled rows and whose keys are the request's first
`end + 1` cached tokens (the KV cache already holds this step's keys when the
backend's forward runs). A batch without such rows costs one dict lookup.

Not covered: sliding-window layers (vLLM's rule there is "(causal AND window)
OR same image", which a plain non-causal call does not express; those layers
keep upstream's causal result) and encoder / cross attention. An image split
across prefill steps cannot attend to its own future tokens; patch
`cpu_mm_prefix_no_chunking` stops the scheduler from splitting images, as
vLLM does on CUDA and ROCm (see `span_rows` for the one case it still can).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# "0" turns the fix off in a running process (the patches stay installed and
# delegate): tests use it to show the bug the patches fix, in the same engine.
ENV_SWITCH = "VLLM_OMNI_CPU_MM_PREFIX"
# Attribute of vLLM's CPUAttentionMetadata that carries our plan to the layers.
PLAN_ATTR = "omni_mm_prefix"


def _warn_split(start: int, end: int, computed: int) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.omni_plugin").warning_once(
        "cpu_mm_prefix: an image (positions %d..%d) is split across steps (%d tokens computed); "
        "its first part attends only to the part computed so far, as on vLLM's GPU backends.",
        start, end, computed,
    )


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


@dataclass(frozen=True)
class SpanBatch:
    """The query rows to recompute, as a batch for `cpu_attention_with_kv_cache`."""

    rows: torch.Tensor  # (n,) int64: rows of this step's query/output tensors
    query_start_loc: torch.Tensor  # (spans + 1,) int32: offsets into `rows`
    seq_lens: torch.Tensor  # (spans,) int32: keys each span's rows attend to (end + 1)
    block_table: torch.Tensor  # (spans, blocks): the owning request's block-table row
    scheduler_metadata: torch.Tensor


def span_rows(
    ranges: dict[int, list[tuple[int, int]]],
    query_start_loc: list[int],
    seq_lens: list[int],
) -> list[tuple[int, int, int, int]]:
    """(request, first row, end row exclusive, key count) per span with rows to recompute.

    A request's scheduled queries are positions [seq_len - query_len, seq_len)
    at rows [query_start_loc[r], query_start_loc[r + 1]).
    """
    out = []
    for req, spans in ranges.items():
        row0, row1 = query_start_loc[req], query_start_loc[req + 1]
        first_pos = seq_lens[req] - (row1 - row0)
        for start, end in spans:
            # Positions start..end-1 scheduled now: the span's last token
            # already sees its whole image causally, so it is left alone.
            lo, hi = max(start, first_pos), min(end - 1, seq_lens[req] - 1)
            if lo > hi:
                continue
            if end >= seq_lens[req]:
                # The image's tail is not computed yet: it was split across
                # steps (chunking is disabled for mm inputs, but the tail after
                # a prefix-cache hit inside an image may still be split under
                # token-budget pressure). Like vLLM's GPU kernels, attend to
                # the keys that exist; the tail's own rows are exact again.
                _warn_split(start, end, seq_lens[req])
            out.append((req, row0 + lo - first_pos, row0 + hi - first_pos + 1, min(end + 1, seq_lens[req])))
    return out


def plan(builder, common) -> SpanBatch | None:
    """The span batch for one step of one KV-cache group, or None when there is nothing to fix."""
    ranges = common.mm_req_doc_ranges
    if not ranges or not enabled():
        return None
    if common.causal is not True or builder.is_cross_attention or builder.is_encoder_only_attention:
        return None
    if builder.window_size != -1:
        return None
    spans = span_rows(ranges, common.query_start_loc_cpu.tolist(), common.seq_lens.tolist())
    if not spans:
        return None

    from vllm import _custom_ops as ops
    from vllm import envs

    rows = torch.cat([torch.arange(a, b, dtype=torch.int64) for _, a, b, _ in spans])
    lengths = torch.tensor([b - a for _, a, b, _ in spans], dtype=torch.int32)
    query_start_loc = torch.zeros(len(spans) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=query_start_loc[1:])
    seq_lens = torch.tensor([n for *_, n in spans], dtype=torch.int32)
    block_table = common.block_table_tensor[torch.tensor([r for r, *_ in spans])]
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(spans),
        num_heads=builder.num_heads,
        num_kv_heads=builder.num_kv_heads,
        head_dim=builder.head_dim,
        seq_lens=seq_lens,
        dtype=builder.dtype,
        query_start_loc=query_start_loc,
        causal=False,  # every row sees all keys up to its span's end
        sliding_window_size=-1,
        isa=builder.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None,
        kv_cache_dtype=builder.kv_cache_dtype,
    )
    return SpanBatch(rows, query_start_loc, seq_lens, block_table, scheduler_metadata)


def attend_spans(impl, layer, query: torch.Tensor, kv_cache: torch.Tensor, batch: SpanBatch, output: torch.Tensor) -> None:
    """Overwrite `output` at `batch.rows` with attention over each row's whole image span."""
    from vllm import _custom_ops as ops

    # The cache layout as CPUAttentionBackendImpl.forward reads it.
    num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
    key_cache, value_cache = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1)).chunk(2, dim=2)
    out = output.new_empty((batch.rows.numel(), *output.shape[1:]))
    ops.cpu_attention_with_kv_cache(
        query=query.index_select(0, batch.rows),
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        scale=impl.scale,
        causal=False,
        alibi_slopes=impl.alibi_slopes,
        sliding_window=-1,
        block_table=batch.block_table,
        softcap=impl.logits_soft_cap,
        scheduler_metadata=batch.scheduler_metadata,
        s_aux=impl.sinks,
        dynamic_causal=None,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    output.index_copy_(0, batch.rows, out)
