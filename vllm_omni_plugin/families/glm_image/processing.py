"""Prompt processing of GlmImageForConditionalGeneration: source images (image-to-image).

A source image is written `<|image|>` in the prompt (GLM-Image's chat template
wraps it in image start / end tokens, the markers its positions look for);
vLLM replaces the placeholder by one `<|image|>` per 16-px patch of the image
as GLM-Image's image processor resizes it, and the model turns those rows into
the image's VQ codes' token embeddings (`embed_multimodal`). Only the image
processor of `processor/` (the tokenizer folder) runs here: the full
`GlmImageProcessor` would also append target grids to the text, which the
AR prompt already carries (glm_image_prompt.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

IMAGE_TOKEN = "<|image|>"


@functools.cache
def _processor(path: str):
    from transformers import GlmImageProcessor

    return GlmImageProcessor.from_pretrained(path)


class GlmImageProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        """GLM-Image's processor lives with its tokenizer (`processor/`), not with the AR weights."""
        return _processor(self.ctx.model_config.tokenizer)

    @property
    def patch_pixels(self) -> int:
        ip = self.get_hf_processor().image_processor
        return ip.patch_size * ip.merge_size

    def max_image_tokens(self, seq_len: int) -> int:
        ip = self.get_hf_processor().image_processor
        return min(ip.size["longest_edge"] // self.patch_pixels**2, seq_len)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.max_image_tokens(seq_len)}


class GlmImageDummyInputsBuilder(BaseDummyInputsBuilder[GlmImageProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None):
        side = int(math.isqrt(self.info.max_image_tokens(seq_len))) * self.info.patch_pixels
        return {"image": self._get_dummy_images(width=side, height=side, num_images=mm_counts.get("image", 0))}


class GlmImageMultiModalProcessor(BaseMultiModalProcessor[GlmImageProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return self.info.get_hf_processor().image_processor(images=hf_data["images"], return_tensors="pt")

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]):
        import torch

        # Empty on a processor-cache hit: the layout is declared for no new items.
        sizes = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.long)).prod(-1)
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", sizes),
            "image_grid_thw": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        image_id = self.info.get_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)

        def patches(i: int) -> list[int]:
            # Looked up when called: on a processor-cache hit the item is not in out_mm_kwargs.
            return [image_id] * int(out_mm_kwargs["image"][i]["image_grid_thw"].data.prod())

        return [PromptReplacement(modality="image", target=[image_id], replacement=patches)]
