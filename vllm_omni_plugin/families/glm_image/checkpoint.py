"""GLM-Image checkpoint (GlmImagePipeline): AR prior + DiT decoder.

Layout (as zai-org/GLM-Image): model_index.json, scheduler/
(FlowMatchEulerDiscreteScheduler), tokenizer/ (ByT5Tokenizer, for glyphs),
text_encoder/ (T5EncoderModel, the ByT5 glyph encoder), processor/
(GlmImageProcessor: image processor + the AR model's GLM tokenizer and chat
template), vision_language_encoder/ (transformers GlmImageForConditionalGeneration:
GLM text model + vision encoder + VQ tokenizer), transformer/
(GlmImageTransformer2DModel), vae/ (AutoencoderKL).

Real dimensions (`full`), from the released configs as transformers'
GlmImage*Config defaults and ollama's GLM-Image port (x/imagegen/models/glm_image)
record them:
  vision_language_encoder  text 40 layers, hidden 4096, 32 heads (2 KV), ffn 13696,
                           rope theta 10000, partial rotary 0.5, mrope [8, 12, 12];
                           vision 40 layers, hidden 1536, 16 heads, patch 16;
                           VQ codebook 16384 x 2048
  transformer              30 layers, 32 heads x 128, text_embed_dim 1472,
                           time_embed_dim 512, condition_dim 256, codebook 16384
  text_encoder             google/byt5-small encoder: d_model 1472, 12 layers,
                           6 heads x 64, d_ff 3584, vocab 384
  vae                      block_out_channels (128, 512, 1024, 1024), 3 layers per
                           block, 16 latent channels, no mid-block attention
  scheduler                base/max shift 0.25/0.75, seq len 256..4096, linear time shift

One deliberate difference: the AR model's `vision_vocab_size` (its LM head
width) is the codebook size, not codebook + 128 control tokens (16512). The
diffusers pipeline feeds every sampled token to the DiT's codebook embedding
unchecked, and a random LM head samples a control token within a few hundred
steps; with only code rows it cannot. The control tokens stay in the vocabulary.
The latents_mean/std of the real VAE are not public here: 0 and 1 are used.

vision_language_encoder/generation_config.json: diffusers samples the AR stage
(`generate(do_sample=True)`) with the checkpoint's generation config, and our AR
stage honours the same file. The released values are not public here; the
factory writes a sampling config of the same shape (`AR_GENERATION`). Tests that
need a deterministic AR stage rewrite it with top_k=1 (both engines then pick
the arg-max token).
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    GlmImagePipeline,
    GlmImageTransformer2DModel,
)
from transformers import (
    ByT5Tokenizer,
    GenerationConfig,
    GlmImageConfig,
    GlmImageForConditionalGeneration,
    GlmImageProcessor,
    T5Config,
    T5EncoderModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

from ...checkpoints.weights import SAVE_DTYPE, random_model
from ...checkpoints.tokenizers import write_glm_image_tokenizer

# The fields of scheduler/scheduler_config.json that differ from the class defaults.
SCHEDULER_CONFIG = dict(base_shift=0.25, max_shift=0.75, use_dynamic_shifting=True, time_shift_type="linear")

CODEBOOK = {"full": 16384, "tiny": 256}
AR_TEXT = {
    "full": dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                 num_key_value_heads=2, mrope_section=[8, 12, 12]),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, mrope_section=[4, 6, 6]),
}  # fmt: skip
AR_VISION = {
    "full": dict(depth=40, hidden_size=1536, num_heads=16, intermediate_size=6144, image_size=2048),
    "tiny": dict(depth=2, hidden_size=64, num_heads=1, intermediate_size=128, image_size=512),
}
VQ_EMBED_DIM = {"full": 2048, "tiny": 64}
TRANSFORMER = {
    "full": dict(num_layers=30, num_attention_heads=32, attention_head_dim=128, time_embed_dim=512, condition_dim=256),
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, time_embed_dim=64, condition_dim=32),
}
GLYPH = {
    "full": dict(d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12),
    "tiny": dict(d_model=64, d_ff=128, d_kv=64, num_heads=1, num_layers=2),
}
GLYPH_COMMON = dict(
    vocab_size=384, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    layer_norm_epsilon=1e-6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    tie_word_embeddings=False,
)  # fmt: skip
VAE = {
    "full": dict(block_out_channels=(128, 512, 1024, 1024), layers_per_block=3),
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
}
VAE_COMMON = dict(
    in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32, mid_block_add_attention=False,
    scaling_factor=0.18215, latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
)  # fmt: skip
# processor/preprocessor_config.json: patches as the vision encoder sees them (16 px, no temporal/merge grouping).
IMAGE_PROCESSOR = dict(
    patch_size=16,
    temporal_patch_size=1,
    merge_size=1,
    min_pixels=256 * 256,
    max_pixels=2048 * 2048,
    image_mean=list(OPENAI_CLIP_MEAN),
    image_std=list(OPENAI_CLIP_STD),
)
# vision_language_encoder/generation_config.json (see the module docstring).
AR_GENERATION = dict(do_sample=True, temperature=0.9, top_p=0.75)


def _ar_config(preset: str, tok) -> GlmImageConfig:
    codebook = CODEBOOK[preset]
    text = dict(AR_TEXT[preset])
    mrope_section = text.pop("mrope_section")
    config = GlmImageConfig(
        text_config=dict(
            **text,
            vocab_size=-(-len(tok) // 64) * 64 if preset == "tiny" else 168064,
            vision_vocab_size=codebook,  # see the module docstring
            attention_bias=True,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=mrope_section
            ),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(**AR_VISION[preset], patch_size=16, spatial_merge_size=1, hidden_act="gelu"),
        vq_config=dict(
            embed_dim=VQ_EMBED_DIM[preset], num_embeddings=codebook, latent_channels=AR_VISION[preset]["hidden_size"]
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=tok.bos_token_id,
        image_end_token_id=tok.eos_token_id,
    )
    config.architectures = ["GlmImageForConditionalGeneration"]
    return config


def build_in_memory(
    family: str = "glm-image",
    preset: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusionPipeline:
    """The pipeline object, weights already on `device` in `dtype`."""
    model = partial(random_model, seed=seed, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        ar_tokenizer = write_glm_image_tokenizer(Path(tmp), codebook_size=CODEBOOK[preset])
    ar_config = _ar_config(preset, ar_tokenizer)
    glyph_config = T5Config(**GLYPH[preset], **GLYPH_COMMON)
    glyph_config.architectures = ["T5EncoderModel"]
    n_blocks = len(VAE[preset]["block_out_channels"])
    vae_blocks = dict(down_block_types=["DownEncoderBlock2D"] * n_blocks, up_block_types=["UpDecoderBlock2D"] * n_blocks)
    pipe = GlmImagePipeline(
        tokenizer=ByT5Tokenizer(),
        processor=GlmImageProcessor(
            image_processor=GlmImageImageProcessorPil(**IMAGE_PROCESSOR),
            tokenizer=ar_tokenizer,
            chat_template=ar_tokenizer.chat_template,
        ),
        text_encoder=model(lambda: T5EncoderModel(glyph_config), component="text_encoder"),
        vision_language_encoder=model(
            lambda: GlmImageForConditionalGeneration(ar_config), component="vision_language_encoder"
        ),
        vae=model(lambda: AutoencoderKL(**VAE[preset], **vae_blocks, **VAE_COMMON), component="vae"),
        transformer=model(
            lambda: GlmImageTransformer2DModel(
                **TRANSFORMER[preset],
                patch_size=2,
                in_channels=16,
                out_channels=16,
                text_embed_dim=GLYPH[preset]["d_model"],
                prior_vq_quantizer_codebook_size=CODEBOOK[preset],
            ),
            component="transformer",
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    text = ar_config.text_config
    pipe.vision_language_encoder.generation_config = GenerationConfig(
        **AR_GENERATION, top_k=CODEBOOK[preset], eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    return pipe


def build(out: Path, *, family: str, preset: str, seed: int, device: str | torch.device = "cpu") -> None:
    """Write the checkpoint into `out`; `device` is where the values are drawn (a GPU makes `full` in seconds)."""
    build_in_memory(family, preset, seed, SAVE_DTYPE[preset], device).save_pretrained(out)
