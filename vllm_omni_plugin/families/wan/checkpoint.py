"""Wan2.2 checkpoints: wan2.2-t2v (WanPipeline), wan2.2-i2v (WanImageToVideoPipeline), both A14B,
and wan2.2-ti2v-5b (WanPipeline with expand_timesteps: text- and image-to-video in one model).

Layout (as Wan-AI/Wan2.2-{T2V,I2V}-A14B-Diffusers): model_index.json with
boundary_ratio, scheduler/ (UniPCMultistepScheduler), text_encoder/
(UMT5EncoderModel), tokenizer/ (T5 tokenizer), transformer/ (high-noise
expert) and transformer_2/ (low-noise expert), vae/ (AutoencoderKLWan, the
Wan2.1 VAE). I2V has no CLIP image encoder in Wan2.2 (image_encoder and
image_processor are null) and its experts take 36 input channels (16 noise +
4 mask + 16 image latents).

TI2V-5B (as Wan-AI/Wan2.2-TI2V-5B-Diffusers): model_index.json with
`expand_timesteps: true`, no boundary_ratio, ONE transformer (transformer_2 null)
taking 48 channels, and the Wan2.2 VAE (z_dim 48, 16x spatial / 4x temporal
compression: `patch_size` 2 on 12 input channels, residual blocks, its own
latents_mean / latents_std), scheduler flow_shift 5.0. A given image is the
first frame: its latent replaces frame 0 and that frame's tokens run at t=0.

Real dimensions (`full`):
  transformer  Wan2.2-*-A14B-Diffusers transformer/config.json (= the Wan2.2
               repo's wan/configs/wan_{t2v,i2v}_A14B.py): dim 5120 = 40 heads x
               128, 40 layers, ffn 13824, freq_dim 256, text_dim 4096
  boundary     0.875 (t2v), 0.900 (i2v), from the same configs
  text_encoder google/umt5-xxl encoder: d_model 4096, 24 layers, 64 heads x 64,
               d_ff 10240, vocab 256384
  vae          AutoencoderKLWan defaults (base_dim 96, z_dim 16)
  scheduler    Wan2.2-T2V-A14B-Diffusers scheduler/scheduler_config.json
  ti2v-5b      transformer dim 3072 = 24 heads x 128, 30 layers, ffn 14336, 48 in/out
               channels (wan/configs/wan_ti2v_5B.py); vae/config.json of the Diffusers repo
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

from ...checkpoints.weights import SAVE_DTYPE, random_model
from ...checkpoints.tokenizers import T5_MODEL_VOCAB, write_t5_tokenizer

# The fields of scheduler/scheduler_config.json that differ from the class defaults.
SCHEDULER_CONFIG = dict(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)

FAMILIES = {
    # family: (pipeline class, transformer in_channels, boundary_ratio)
    "wan2.2-t2v": (WanPipeline, 16, 0.875),
    "wan2.2-i2v": (WanImageToVideoPipeline, 36, 0.9),
    "wan2.2-ti2v-5b": (WanPipeline, 48, None),
}
TI2V = "wan2.2-ti2v-5b"

TRANSFORMER = {
    "full": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
    "tiny": dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64),
}
TRANSFORMER_COMMON = dict(
    patch_size=(1, 2, 2), out_channels=16, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
VAE = {"full": {}, "tiny": dict(base_dim=8, num_res_blocks=1)}
TI2V_TRANSFORMER = {
    "full": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, text_dim=4096),
    "tiny": TRANSFORMER["tiny"],
}
# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (the Wan2.2 VAE).
WAN22_VAE_COMMON = dict(
    z_dim=48, in_channels=12, out_channels=12, patch_size=2, is_residual=True, scale_factor_spatial=16,
    scale_factor_temporal=4, temperal_downsample=[False, True, True], dim_mult=[1, 2, 4, 4],
    latents_mean=[
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    latents_std=[
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
)  # fmt: skip
WAN22_VAE = {"full": dict(base_dim=160, decoder_base_dim=256, num_res_blocks=2),
             "tiny": dict(base_dim=8, decoder_base_dim=8, num_res_blocks=1)}
TI2V_SCHEDULER_CONFIG = {**dict(prediction_type="flow_prediction", use_flow_sigmas=True), "flow_shift": 5.0}
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

    ti2v = family == TI2V
    dims = TI2V_TRANSFORMER[preset] if ti2v else TRANSFORMER[preset]

    def expert() -> WanTransformer3DModel:
        common = {**TRANSFORMER_COMMON, "out_channels": 48} if ti2v else TRANSFORMER_COMMON
        return WanTransformer3DModel(**dims, **common, in_channels=in_channels)

    vae = (lambda: AutoencoderKLWan(**WAN22_VAE[preset], **WAN22_VAE_COMMON)) if ti2v else (
        lambda: AutoencoderKLWan(**VAE[preset]))
    components = dict(
        tokenizer=tokenizer,
        text_encoder=model(lambda: UMT5EncoderModel(text_config), component="text_encoder"),
        vae=model(vae, component="vae"),
        scheduler=UniPCMultistepScheduler(**(TI2V_SCHEDULER_CONFIG if ti2v else SCHEDULER_CONFIG)),
        transformer=model(expert, component="transformer"),  # high-noise expert (t >= boundary); TI2V: the model
        # low-noise expert; TI2V-5B has one transformer only
        transformer_2=None if ti2v else model(expert, component="transformer_2"),
        boundary_ratio=boundary_ratio,
    )
    if ti2v:
        components["expand_timesteps"] = True
    if pipeline_cls is WanImageToVideoPipeline:
        components.update(image_processor=None, image_encoder=None)
    return pipeline_cls(**components)


def build(out: Path, *, family: str, preset: str, seed: int) -> None:
    build_in_memory(family, preset, seed, SAVE_DTYPE[preset]).save_pretrained(out)
