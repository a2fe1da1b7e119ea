"""Prompt processing of OmniBagelForConditionalGeneration: an image placeholder becomes BAGEL's image block.

vLLM's Bagel replaces `<|image_pad|>` by a run of image tokens and makes only
that run the image's multimodal range. BAGEL's image block is
[<|vision_start|>, ViT tokens, <|vision_end|>]: one RoPE position and full
attention among all of them, markers included. So here the whole block is
the image's placeholder range (every row an "embedding" row: the model
supplies the two markers' token embeddings around the ViT tokens), and
vLLM's range-based machinery -- mm-prefix attention spans, prefix-cache
hashing, the per-request ranges the M-RoPE hook and the KV connector see --
covers exactly BAGEL's block.

A prompt may write the image as `<|vision_start|><|image_pad|><|vision_end|>`
(BAGEL's own form) or as a bare `<|image_pad|>` (vLLM's chat placeholder):
both become one block with one pair of markers (the earliest match wins, so
the wrapped form is taken whole).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm.model_executor.models.bagel import BagelMultiModalProcessor, BagelProcessingInfo
from vllm.multimodal.processing import PromptReplacement

SOI, IMAGE_PAD, EOI = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


def vit_tokens_per_image(hf_config) -> int:
    """ViT tokens of one image: the processor resizes every image to the ViT's square input."""
    side = hf_config.vit_config.image_size // hf_config.vit_config.patch_size
    return side * side


def marker_ids(tokenizer) -> tuple[int, int, int]:
    """(<|vision_start|>, <|image_pad|>, <|vision_end|>) ids; a tokenizer without them is no BAGEL tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (SOI, IMAGE_PAD, EOI) if t not in vocab]
    if missing:
        raise ValueError(f"BAGEL's tokenizer must have the image tokens {missing}")
    return vocab[SOI], vocab[IMAGE_PAD], vocab[EOI]


class OmniBagelProcessingInfo(BagelProcessingInfo):
    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": vit_tokens_per_image(self.get_hf_config()) + 2}  # + the two markers


class OmniBagelMultiModalProcessor(BagelMultiModalProcessor):
    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        start, pad, end = marker_ids(self.info.get_tokenizer())
        block = [start] + [pad] * vit_tokens_per_image(self.info.get_hf_config()) + [end]
        return [
            PromptReplacement(modality="image", target=[start, pad, end], replacement=block),
            PromptReplacement(modality="image", target=[pad], replacement=block),
        ]
