"""`GlmImageForConditionalGeneration`: GLM-Image's AR model (the image-token prior) in vLLM.

vLLM 0.32 has no GLM-Image; transformers 5.x has the reference
(`transformers.models.glm_image`). This is the same network on vLLM's own
layers, so plain `vllm.LLM("<checkpoint>/vision_language_encoder",
tokenizer="<checkpoint>/processor")` runs it (the plugin registers the
architecture; config.json names it):

  text model   GLM-4 decoder layers (vLLM's `Glm4DecoderLayer`: sandwich norms,
               fused gate_up MLP) with a NEOX-style partial M-RoPE (GLM-4's own
               is interleaved; GLM-Image rotates halves, as transformers'
               `apply_rotary_pos_emb` does), in vLLM's `LlamaModel` stack;
  LM head      `vision_vocab_size` wide: only image tokens can be sampled. The
               logits are returned vocabulary-wide with -inf beyond it, so vLLM's
               sampler, penalties and logprobs see one ordinary vocabulary;
  positions    glm_image_positions.py: the prompt's, and the generated grids'
               (vLLM numbers generated tokens on a line; GLM-Image puts them on
               the target grids named in the prompt, glm_image_prompt.py).

Sampling defaults come from the checkpoint's generation_config.json, which
vLLM reads (`generation_config="auto"`), as transformers' `generate` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.glm4 import Glm4DecoderLayer
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from .image_tokens import image_codes
from .positions import DecodeGridTable, prompt_positions
from .processing import (
    IMAGE_TOKEN,
    GlmImageDummyInputsBuilder,
    GlmImageMultiModalProcessor,
    GlmImageProcessingInfo,
)
from .prompt import GRID_BOS, GRID_EOS, parse_grids


class GlmImageDecoderLayer(Glm4DecoderLayer):
    """GLM-4's decoder layer with GLM-Image's rotary style (halves rotated, not pairs)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config)
        config = config or vllm_config.model_config.hf_config
        attn = self.self_attn
        attn.rotary_emb = get_rope(
            attn.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class GlmImageTextModel(LlamaModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=GlmImageDecoderLayer)


@MULTIMODAL_REGISTRY.register_processor(
    GlmImageMultiModalProcessor, info=GlmImageProcessingInfo, dummy_inputs=GlmImageDummyInputsBuilder
)
class GlmImageForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """GLM-Image's AR prior: prompt (+ source images) (+ target grids) -> image tokens on those grids."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == "image":
            return IMAGE_TOKEN
        raise ValueError(f"GLM-Image takes images only, not {modality}")

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.",
            "model.visual.": "visual.",
            "model.vqmodel.": "vqmodel.",
            "lm_head.": "lm_head.",
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        text = config.text_config
        self.config = config
        self.vocab_size = text.vocab_size
        self.vision_vocab_size = text.vision_vocab_size
        self.language_model = GlmImageTextModel(
            vllm_config=vllm_config.with_hf_config(text, architectures=["Glm4ForCausalLM"]),
            prefix=maybe_prefix(prefix, "language_model"),
        )
        self.lm_head = ParallelLMHead(
            text.vision_vocab_size, text.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )  # fmt: skip
        self.logits_processor = LogitsProcessor(text.vision_vocab_size)
        # The image tokenizer (source images -> VQ codes, image-to-image): transformers'
        # modules, run once per source image; the per-token work is the text model's.
        from transformers.models.glm_image.modeling_glm_image import GlmImageVisionModel, GlmImageVQVAE

        config.vision_config._attn_implementation = "sdpa"
        self.visual = GlmImageVisionModel._from_config(config.vision_config)
        self.vqmodel = GlmImageVQVAE._from_config(config.vq_config)
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        self._grid_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in (GRID_BOS, GRID_EOS))
        self._decode = tokenizer.decode
        self.decode_grids = DecodeGridTable(device=self.lm_head.weight.device)

    # ---------------------------------------------------------------- positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """The prompt's GLM-Image positions, and the delta that turns generated tokens into grid codes."""
        images = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            _, h, w = f.data["image_grid_thw"].data.tolist()
            images.append((f.mm_position.offset, f.mm_position.length, h, w))
        positions, start = prompt_positions(len(input_tokens), images)
        groups = parse_grids(input_tokens, *self._grid_ids, self._decode)
        if not groups:
            # Text only, no target grid: GLM-Image numbers generated tokens on a line.
            return positions, start - len(input_tokens)
        return positions, self.decode_grids.register(len(input_tokens), start, groups[::-1])

    # ---------------------------------------------------------------- forward

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        """Each source image as the token embeddings of its VQ codes (what transformers feeds the text model)."""
        pixels, grids = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
        if pixels is None:
            return ()
        if isinstance(pixels, (list, tuple)):
            pixels = torch.cat(list(pixels))
        grids = torch.as_tensor(grids).reshape(-1, 3)
        codes = image_codes(self.visual, self.vqmodel, pixels, grids)
        return tuple(self.language_model.embed_input_ids(c) for c in codes)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.language_model(input_ids, self.decode_grids.positions(positions), intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is None or logits.shape[-1] >= self.vocab_size:
            return logits
        # Text tokens cannot be generated: -inf, so the vocabulary vLLM samples from stays whole.
        pad = logits.new_full((logits.shape[0], self.vocab_size - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
