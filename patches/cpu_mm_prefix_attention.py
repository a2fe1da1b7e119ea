"""Patch: CPU attention recomputes image rows bidirectionally (mm-prefix attention).

The replacement runs vLLM's CPU attention unchanged (causal, correct for every
row outside an image), then, where `cpu_mm_prefix_metadata` planned it for
this step, overwrites the rows inside each image with a second, non-causal
call of the same kernel over the keys up to the image's end.
"""

from __future__ import annotations

import functools

from . import Patch, _cpu_mm_prefix


def _make_replacement(original):
    from vllm.v1.attention.backend import AttentionType

    @functools.wraps(original)
    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        result = original(
            self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        batch = getattr(attn_metadata, _cpu_mm_prefix.PLAN_ATTR, None)
        # Sliding-window layers can share a group whose builder saw no window
        # (vLLM takes the group's window only when all layers agree): skip them here.
        if batch is not None and self.attn_type == AttentionType.DECODER and self.sliding_window == -1:
            _cpu_mm_prefix.attend_spans(self, layer, query, kv_cache, batch, output)
        return result

    return forward


PATCH = Patch(
    name="cpu_mm_prefix_attention",
    target="vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
    why=(
        "vLLM's CPU attention kernel is causal over image tokens of mm-prefix models (BAGEL), "
        "whose image tokens must attend bidirectionally; CPU answers then differ from the model's."
    ),
    how=(
        "Call the original forward, then, if the step's metadata carries a plan from "
        "cpu_mm_prefix_metadata, run cpu_attention_with_kv_cache non-causally for the planned image "
        "rows (keys: the request's cache up to the image end, this step's keys included) and copy "
        "the result into those output rows. Every other row is the original kernel's output, untouched."
    ),
    upstream=(
        "Same fix as cpu_mm_prefix_metadata, which upstream could take into "
        "CPUAttentionBackendImpl.forward; not proposed yet."
    ),
    checked=("0.32.0",),
    signature=(
        "(self, layer: vllm.v1.attention.backend.AttentionLayer, query: torch.Tensor, key: torch.Tensor, "
        "value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: vllm.v1.attention.backends.cpu_attn."
        "CPUAttentionMetadata | None, output: torch.Tensor, output_scale: torch.Tensor | None = None, "
        "output_block_scale: torch.Tensor | None = None) -> torch.Tensor"
    ),
    requires=(
        "vllm._custom_ops:cpu_attention_with_kv_cache",
        "vllm.v1.attention.backend:AttentionType.DECODER",
    ),
    make_replacement=_make_replacement,
    platforms=("cpu",),
)
