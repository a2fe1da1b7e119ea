"""Patch: the CPU attention metadata builder plans mm-prefix (bidirectional image) attention.

vLLM's model runner passes every builder the per-request image position
ranges (`CommonAttentionMetadata.mm_req_doc_ranges`, set only when
`model_config.is_mm_prefix_lm`); the CPU builder drops them. The replacement
builds the upstream metadata unchanged and, when some scheduled query rows
lie inside an image before its last token, attaches a small extra batch for
those rows (see `_cpu_mm_prefix`); `cpu_mm_prefix_attention` runs it.
"""

from __future__ import annotations

import functools

from . import Patch, _cpu_mm_prefix


def _make_replacement(original):
    @functools.wraps(original)
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = original(self, common_prefix_len, common_attn_metadata, fast_build)
        batch = _cpu_mm_prefix.plan(self, common_attn_metadata)
        if batch is not None:
            setattr(metadata, _cpu_mm_prefix.PLAN_ATTR, batch)
        return metadata

    return build


PATCH = Patch(
    name="cpu_mm_prefix_metadata",
    target="vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
    why=(
        "The CPU attention backend ignores mm_req_doc_ranges, so on vLLM's CPU build image "
        "tokens of mm-prefix models (BAGEL) attend causally instead of bidirectionally."
    ),
    how=(
        "Call the original build; if image rows before their span's last token are scheduled, "
        "attach (as metadata.omni_mm_prefix) their row indices, per-span key counts, block-table "
        "rows and a non-causal scheduler metadata for cpu_attention_with_kv_cache. Nothing is "
        "attached for text-only batches, non-mm-prefix models, sliding-window groups or "
        "encoder/cross attention. VLLM_OMNI_CPU_MM_PREFIX=0 switches it off at run time."
    ),
    upstream=(
        "Upstream could take it: the CPU backend would honour mm_req_doc_ranges the way "
        "flash_attn/triton_attn do (its C++ kernel has no per-token mask, so a second "
        "non-causal pass over the image rows, as here, is the least intrusive form). Not proposed yet."
    ),
    checked=("0.32.0",),
    signature=(
        "(self, common_prefix_len: int, common_attn_metadata: vllm.v1.attention.backend."
        "CommonAttentionMetadata, fast_build: bool = False) -> vllm.v1.attention.backends."
        "cpu_attn.CPUAttentionMetadata"
    ),
    requires=(
        "vllm.v1.attention.backend:CommonAttentionMetadata.mm_req_doc_ranges",
        "vllm._custom_ops:cpu_attn_get_scheduler_metadata",
    ),
    make_replacement=_make_replacement,
    platforms=("cpu",),
)
