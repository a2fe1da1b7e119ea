"""Wan2.2 A14B checkpoints: wan2.2-t2v (WanPipeline) and wan2.2-i2v (WanImageToVideoPipeline).

Layout (as Wan-AI/Wan2.2-{T2V,I2V}-A14B-Diffusers): model_index.json with
boundary_ratio, scheduler/ (UniPCMultistepScheduler), text_encoder/
(UMT5EncoderModel), tokenizer/ (T5 tokenizer), transformer/ (high-noise
expert) and transformer_2/ (low-noise expert), vae/ (AutoencoderKLWan, the
Wan2.1 VAE). I2V has no CLIP image encoder in Wan2.2 (image_encoder and
image_processor are null) and its experts take 36 input channels (16 noise +
4 mask + 16 image latents).

Real dimensions (`full`):
  transformer  Wan2.2-*-A14B-Diffusers transformer/config.json (= the Wan2.2
               repo's wan/configs/wan_{t2v,i2v}_A14B.py): dim 5120 = 40 heads x
               128, 40 layers, ffn 13824, freq_dim 256, text_dim 4096
  boundary     0.875 (t2v), 0.900 (i2v), from the same configs
  text_encoder google/umt5-xxl encoder: d_model 4096, 24 layers, 64 heads x 64,
               d_ff 10240, vocab 256384
  vae          AutoencoderKLWan defaults (base_dim 96, z_dim 16)
  scheduler    Wan2.2-T2V-A14B-Diffusers scheduler/scheduler_config.json
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from ._weights import SAVE_DTYPE, random_model
from .tokenizers import T5_MODEL_VOCAB, write_t5_tokenizer

# The fields of scheduler/scheduler_config.json that differ from the class defaults.
SCHEDULER_CONFIG = dict(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)

FAMILIES = {
    # family: (pipeline class, transformer in_channels, boundary_ratio)
    "wan2.2-t2v": (WanPipeline, 16, 0.875),
    "wan2.2-i2v": (WanImageToVideoPipeline, 36, 0.9),
}

TRANSFORMER = {
    "full": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
    "tiny": dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64),
}
TRANSFORMER_COMMON = dict(
    patch_size=(1, 2, 2), out_channels=16, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
VAE = {"full": {}, "tiny": dict(base_dim=8, num_res_blocks=1)}
TEXT = {
    "full": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "tiny": dict(vocab_size=T5_MODEL_VOCAB, d_model=64, d_kv=64, d_ff=128, num_layers=2, num_heads=2),
}
TEXT_COMMON = dict(
    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, scalable_attention=True,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip


def build_in_memory(
    family: str,
    preset: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusionPipeline:
    """The pipeline object, weights already on `device` in `dtype`."""
    pipeline_cls, in_channels, boundary_ratio = FAMILIES[family]
    model = partial(random_model, seed=seed, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_t5_tokenizer(Path(tmp))
    text_config = UMT5Config(**TEXT[preset], **TEXT_COMMON)
    text_config.architectures = ["UMT5EncoderModel"]

    def expert() -> WanTransformer3DModel:
        return WanTransformer3DModel(**TRANSFORMER[preset], **TRANSFORMER_COMMON, in_channels=in_channels)

    components = dict(
        tokenizer=tokenizer,
        text_encoder=model(lambda: UMT5EncoderModel(text_config), component="text_encoder"),
        vae=model(lambda: AutoencoderKLWan(**VAE[preset]), component="vae"),
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        transformer=model(expert, component="transformer"),  # high-noise expert (t >= boundary)
        transformer_2=model(expert, component="transformer_2"),  # low-noise expert
        boundary_ratio=boundary_ratio,
    )
    if pipeline_cls is WanImageToVideoPipeline:
        components.update(image_processor=None, image_encoder=None)
    return pipeline_cls(**components)


def build(out: Path, *, family: str, preset: str, seed: int) -> None:
    build_in_memory(family, preset, seed, SAVE_DTYPE[preset]).save_pretrained(out)
