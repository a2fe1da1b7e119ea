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

from vllm.model_executor.models.bagel import BagelDummyInputsBuilder, BagelMultiModalProcessor, BagelProcessingInfo
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import PromptReplacement

SOI, IMAGE_PAD, EOI = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
# img2img: the image to edit, through the VAE. Its placeholder is a Qwen2 special
# token BAGEL never uses; its rows are the generation expert's (bagel_mot.py).
VAE_IMAGE, VAE_PAD = "vae_image", "<|vision_pad|>"


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


def latent_geometry(hf_config) -> tuple[int, int]:
    """(pixels per latent token side, largest image side the latent position table covers)."""
    d = hf_config.vae_config["downsample"] if isinstance(hf_config.vae_config, dict) else hf_config.vae_config.downsample
    d *= getattr(hf_config, "latent_patch_size", 2)
    return d, d * hf_config.max_latent_size


def vae_block_size(hf_config, width: int, height: int) -> int:
    """Tokens of an edit image's VAE block: its latent tokens + the two markers."""
    d, side = latent_geometry(hf_config)
    if width % d or height % d or not (d <= width <= side and d <= height <= side):
        raise ValueError(f"a BAGEL {VAE_IMAGE} must be {d}..{side} px per side in multiples of {d} "
                         f"(the output size; resize it before the request); got {width}x{height}")
    return (width // d) * (height // d) + 2


def vae_pad_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    if VAE_PAD not in vocab:
        raise ValueError(f"BAGEL's tokenizer must have {VAE_PAD} for img2img inputs")
    return vocab[VAE_PAD]


class VaeImageItems(ProcessorBatchItems):
    """Edit images (PIL) of the `vae_image` modality; handed to the processor as `vae_images`."""

    def __init__(self, data: Sequence[Any]) -> None:
        super().__init__(data, VAE_IMAGE)


class OmniBagelDataParser(MultiModalDataParser):
    def _parse_vae_image_data(self, data: Any) -> VaeImageItems | None:
        if data is None:
            return None
        items = self._parse_image_data(data)  # the image rules (RGB, lists); no embeddings
        if not hasattr(items, "get_image_size"):
            raise ValueError(f"{VAE_IMAGE} takes images, not embeddings")
        return VaeImageItems(items.data)

    def _get_subparsers(self):
        return {**super()._get_subparsers(), VAE_IMAGE: self._parse_vae_image_data}


class OmniBagelProcessingInfo(BagelProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return OmniBagelDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                                   allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    @property
    def accepts_vae_images(self) -> bool:
        """img2img inputs are opt-in: only an engine whose `limit_mm_per_prompt` names `vae_image`
        (the BAGEL stage config's AR stage) takes them. Every other engine keeps the image-only
        modality set -- its profiling, budgets and outputs unchanged."""
        return VAE_IMAGE in (self.ctx.get_mm_config().limit_per_prompt or {})

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        limits = dict(super().get_supported_mm_limits())
        if self.accepts_vae_images:
            limits[VAE_IMAGE] = None
        return limits

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        config = self.get_hf_config()
        tokens = {"image": vit_tokens_per_image(config) + 2}  # + the two markers
        if self.accepts_vae_images:
            _, side = latent_geometry(config)
            tokens[VAE_IMAGE] = vae_block_size(config, side, side)
        return tokens


class OmniBagelDummyInputsBuilder(BagelDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return f"{SOI}{VAE_PAD}{EOI}" * mm_counts.get(VAE_IMAGE, 0) + super().get_dummy_text(mm_counts)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any):
        data = dict(super().get_dummy_mm_data(seq_len, mm_counts, mm_options))
        if mm_counts.get(VAE_IMAGE, 0):
            _, side = latent_geometry(self.info.get_hf_config())
            data[VAE_IMAGE] = self._get_dummy_images(width=side, height=side, num_images=mm_counts[VAE_IMAGE])
        return data


class OmniBagelMultiModalProcessor(BagelMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        from transformers.feature_extraction_utils import BatchFeature

        from vllm_omni_plugin.families.bagel.dit.encode import image_pixels

        hf_data = dict(hf_data)
        edits = hf_data.pop(f"{VAE_IMAGE}s", None)
        out = super()._call_hf_processor(hf_data, hf_kwargs) if "images" in hf_data else BatchFeature()
        if edits is not None:
            config = self.info.get_hf_config()
            for image in edits:
                vae_block_size(config, *image.size)  # the size rule, with a clear error
            # [-1, 1] at the image's own size (= the output size), as encode_context feeds the VAE.
            out["vae_pixel_values"] = [image_pixels(image, image.size[1], image.size[0]) for image in edits]
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                "vae_pixel_values": MultiModalFieldConfig.batched(VAE_IMAGE)}

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        tokenizer = self.info.get_tokenizer()
        start, pad, end = marker_ids(tokenizer)
        block = [start] + [pad] * vit_tokens_per_image(self.info.get_hf_config()) + [end]
        updates = [
            PromptReplacement(modality="image", target=[start, pad, end], replacement=block),
            PromptReplacement(modality="image", target=[pad], replacement=block),
        ]
        if VAE_IMAGE in mm_items:
            vpad, config = vae_pad_id(tokenizer), self.info.get_hf_config()
            items = mm_items[VAE_IMAGE]

            def vae_block(i: int) -> list[int]:
                return [start] + [vpad] * (vae_block_size(config, *items.get(i).size) - 2) + [end]

            updates.append(PromptReplacement(modality=VAE_IMAGE, target=[start, vpad, end], replacement=vae_block))
        return updates
