"""`OmniBagelForConditionalGeneration`: the BAGEL AR stage as this plugin runs it.

vLLM's own `BagelForConditionalGeneration` (understanding: text2text,
img2text) under the omni architecture name, so that a checkpoint whose config
names this architecture loads through the plugin's registry and gets
bidirectional attention over image tokens from the `is_mm_prefix_lm` patch,
plus what the diffusion stage needs from the AR stage besides the KV cache:
per request, the RoPE position the generated image block takes and the shapes
of the request's input images, keyed by request id (ARCHITECTURE.md
principle 6).

Why those facts are computed from the KV connector's `SaveSpec` and not in the
forward: in vLLM 0.32 a model's forward sees one flattened batch and no
request ids (the runner may reorder requests, so batch rows are no key), and
with CUDA graphs a forward is replayed without running Python at all. The
connector's scheduler side knows, per step, which requests complete their
prompt (`SaveSpec`: id, prompt length, multimodal ranges), and the facts are a
function of that spec and the model's config alone. So the model registers
itself as the process's metadata source when it is built, and the connector's
`wait_for_save` asks it (`kv_transfer_metadata(spec)`) while it stores the
request's K/V. The forward holds no per-request state.

BAGEL's prompt layout (what makes the KV cache the one ByteDance's BAGEL
computes, and what the diffusion stage expects): each image block
[<|vision_start|>, ViT tokens, <|vision_end|>] is one multimodal placeholder
range (processing.py), so it attends bidirectionally as a whole, markers
included; and it shares ONE RoPE position, the next token taking that + 1
(positions.py). The positions reach vLLM through its M-RoPE hook with
three identical rows, switched on for this architecture by vllm_config.py.

img2img (bagel_gen.py): an edit image arrives as the `vae_image` modality, a
[<|vision_start|>, <|vision_pad|> x n, <|vision_end|>] block whose latent rows
are VAE-encoded and run through the MoT generation expert; the raw input ids
(`requires_raw_input_tokens`) say which rows those are. Batches without them
take vLLM's unchanged forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.models.bagel import BagelForConditionalGeneration
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from vllm_omni_plugin.kv.connector import SaveSpec, register_metadata_source

from .vllm_gen import BagelGenerationSide, is_generation_weight
from .positions import bagel_positions, block_ranges
from .processing import (
    VAE_IMAGE,
    OmniBagelDummyInputsBuilder,
    OmniBagelMultiModalProcessor,
    OmniBagelProcessingInfo,
    marker_ids,
    vae_pad_id,
)


@MULTIMODAL_REGISTRY.register_processor(
    OmniBagelMultiModalProcessor, info=OmniBagelProcessingInfo, dummy_inputs=OmniBagelDummyInputsBuilder
)
class OmniBagelForConditionalGeneration(BagelForConditionalGeneration, SupportsMRoPE):
    """vLLM's Bagel with BAGEL's image blocks and positions, img2img VAE blocks, and keyed KV-transfer metadata."""

    # The forward needs the token ids next to the embeddings: <|vision_pad|> rows
    # are the generation expert's. (vLLM's Qwen2Model ignores the ids when given embeddings.)
    requires_raw_input_tokens = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == VAE_IMAGE:
            return "<|vision_start|><|vision_pad|><|vision_end|>"
        return super().get_placeholder_str(modality, i)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if not vllm_config.model_config.uses_mrope:
            # Without it vLLM numbers every token and the image blocks silently get wrong positions.
            raise RuntimeError(
                "OmniBagelForConditionalGeneration needs vLLM's M-RoPE path for BAGEL's positions; "
                "its config hook was not registered in the process that built the engine config "
                "(vllm_omni_plugin.families.bagel.vllm_config.register_config_hook, run by the plugin's register())"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        start, _, end = marker_ids(tokenizer)
        # The markers are rows of the image's placeholder range, so the image's
        # "embedding" carries their (ordinary) token embeddings around the ViT tokens.
        self.register_buffer("_marker_ids", torch.tensor([start, end]), persistent=False)
        self._vae_pad_id = vae_pad_id(tokenizer)
        embed = self.language_model.model.embed_tokens.weight
        self.generation = BagelGenerationSide(self.config, embed.dtype, embed.device)
        register_metadata_source(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's Bagel loading, plus the generation side's tensors (which vLLM's Bagel drops)."""

        def understanding():
            for name, tensor in weights:
                if is_generation_weight(name):
                    self.generation.load(name, tensor)
                else:
                    yield name, tensor

        return super().load_weights(understanding())

    # ---------------------------------------------------------------- BAGEL's prompt layout

    def _with_markers(self, blocks) -> tuple[torch.Tensor, ...]:
        markers = self.language_model.embed_input_ids(self._marker_ids.to(blocks[0].device)).to(blocks[0].dtype)
        return tuple(torch.cat([markers[:1], tokens.to(markers.dtype), markers[1:]]) for tokens in blocks)

    def embed_multimodal(self, **kwargs: object):
        vae_pixels = kwargs.pop("vae_pixel_values", None)
        if vae_pixels is not None:  # vLLM embeds one modality per call
            if kwargs.get("pixel_values") is not None:
                raise ValueError("one embed_multimodal call got both vae_image and image inputs")
            return self._with_markers([self.generation.latent_tokens(p) for p in vae_pixels])
        vit = super().embed_multimodal(**kwargs)
        if not vit:
            return vit
        return self._with_markers(vit)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """BAGEL's positions as three identical M-RoPE rows, and the offset of later tokens.

        Generated tokens are numbered by vLLM as index + delta, so delta is the
        next BAGEL position minus the prompt length.
        """
        blocks = block_ranges([(f.modality, f.mm_position.offset, f.mm_position.length) for f in mm_features])
        positions, next_position = bagel_positions(len(input_tokens), blocks)
        return torch.tensor(positions, dtype=torch.long).expand(3, -1).clone(), next_position - len(input_tokens)

    # ---------------------------------------------------------------- KV transfer metadata

    def kv_transfer_metadata(self, spec: SaveSpec) -> dict[str, Any]:
        """The diffusion stage's facts about one request whose prompt is complete."""
        vit = self.config.vit_config
        blocks = block_ranges(spec.mm_ranges)
        _, next_position = bagel_positions(spec.num_tokens, blocks)
        return {
            # The generated image block's RoPE position: the one after the prompt's
            # last, counting each image block as one position (BAGEL's layout).
            "latent_position": next_position,
            # vLLM's Bagel processor resizes every understanding image to the ViT's
            # square input, so that is the shape each ViT block went through the ViT at.
            "image_shapes": [[vit.image_size, vit.image_size] for m, _, _ in spec.mm_ranges if m == "image"],
            # (offset, length) of each image block (ViT and VAE) in the prompt, markers included.
            "image_token_ranges": [[offset, length] for offset, length in blocks],
            # img2img: latent tokens of each VAE block (its [H, W] is the request's output
            # size, which the orchestrator set; the block alone does not determine it).
            "vae_latent_tokens": [length - 2 for m, _, length in spec.mm_ranges if m == VAE_IMAGE],
        }

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if input_ids is not None and inputs_embeds is not None and intermediate_tensors is None and not _capturing(input_ids):
            gen = input_ids == self._vae_pad_id
            # A host sync, once per eager step. Never reached under CUDA-graph capture:
            # vLLM captures (and replays) whole forwards only for uniform decode batches,
            # and VAE blocks only occur in prompts, scheduled whole (>= 3 tokens per request).
            if bool(gen.any()):  # an img2img VAE block in this batch: MoT routing
                if not self.generation.loaded:
                    raise RuntimeError("an img2img (vae_image) input, but the checkpoint's generation weights were not loaded")
                return self.generation.forward(self.language_model.model, positions, inputs_embeds, gen)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on `t`'s device (host syncs are illegal then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
