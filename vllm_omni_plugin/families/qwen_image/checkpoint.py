"""Qwen-Image family checkpoints: qwen-image, qwen-image-edit(-plus), qwen-image-layered.

Layout (as the Qwen/Qwen-Image* repos): model_index.json, scheduler/,
transformer/ (QwenImageTransformer2DModel), vae/ (AutoencoderKLQwenImage),
text_encoder/ (Qwen2_5_VLForConditionalGeneration), tokenizer/
(Qwen2Tokenizer), and for edit/layered processor/ (Qwen2VLProcessor).

Real dimensions (`full`) are those of the published configs:
  transformer  Qwen/Qwen-Image transformer/config.json (= diffusers'
               QwenImageTransformer2DModel defaults): 60 layers, 24 heads x 128,
               joint_attention_dim 3584, in_channels 64, out_channels 16,
               axes_dims_rope (16, 56, 56); Layered adds use_additional_t_cond
               and use_layer3d_rope, and its VAE has 4 (RGBA) input channels.
  vae          Qwen/Qwen-Image vae/config.json (= AutoencoderKLQwenImage defaults)
  text_encoder Qwen/Qwen2.5-VL-7B-Instruct config.json
  scheduler    Qwen/Qwen-Image scheduler/scheduler_config.json
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageLayeredPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ...diffusion.processors import load_processor  # runtime class; imported back for the factory
from ...checkpoints.weights import SAVE_DTYPE, random_model
from ...checkpoints.tokenizers import QWEN2_MODEL_VOCAB, write_qwen2_tokenizer

PIPELINES = {
    "qwen-image": QwenImagePipeline,
    "qwen-image-edit": QwenImageEditPipeline,
    "qwen-image-edit-plus": QwenImageEditPlusPipeline,  # Qwen/Qwen-Image-Edit-2509: the same components
    "qwen-image-layered": QwenImageLayeredPipeline,
}

# The fields of scheduler/scheduler_config.json that differ from the class defaults.
SCHEDULER_CONFIG = dict(max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02, use_dynamic_shifting=True)

TRANSFORMER = {
    "full": dict(num_layers=60, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=3584),
    # head_dim 64 with the real 1:3.5:3.5 split of the rotary axes.
    "tiny": dict(
        num_layers=2, num_attention_heads=2, attention_head_dim=64, joint_attention_dim=128, axes_dims_rope=(8, 28, 28)
    ),
}
VAE = {"full": {}, "tiny": dict(base_dim=8, num_res_blocks=1)}

# Qwen2.5-VL-7B-Instruct. Token ids are set from our tokenizer in `_text_encoder_config`.
TEXT = {
    "full": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_window_layers=28, mrope_section=[16, 24, 24]),
    "tiny": dict(vocab_size=QWEN2_MODEL_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_window_layers=2, mrope_section=[8, 12, 12]),
}  # fmt: skip
VISION = {
    "full": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    "tiny": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=1, out_hidden_size=128, fullatt_block_indexes=[1]),
}
VISION_COMMON = dict(
    hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    tokens_per_second=2, window_size=112,
)  # fmt: skip
# processor/preprocessor_config.json of Qwen/Qwen-Image-Edit (= Qwen2.5-VL-7B-Instruct's).
IMAGE_PROCESSOR = dict(
    do_convert_rgb=True,
    do_normalize=True,
    do_rescale=True,
    do_resize=True,
    image_mean=list(OPENAI_CLIP_MEAN),
    image_std=list(OPENAI_CLIP_STD),
    max_pixels=12845056,
    merge_size=2,
    min_pixels=3136,
    patch_size=14,
    resample=3,
    rescale_factor=1 / 255,
    temporal_patch_size=2,
)


def _write_processor(folder: Path, tokenizer) -> None:
    """processor/ as in Qwen/Qwen-Image-Edit: image + video preprocessor configs, tokenizer, chat template.

    Written by hand (not `Qwen2VLProcessor.save_pretrained`) so that the files
    are the real ones and the same bytes whether or not torchvision is installed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    for name, kind in (("preprocessor_config.json", "image"), ("video_preprocessor_config.json", "video")):
        config = {f"{kind}_processor_type": f"Qwen2VL{kind.capitalize()}Processor", "processor_class": "Qwen2VLProcessor"}
        config.update(IMAGE_PROCESSOR)
        (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _text_encoder_config(preset: str, tok) -> Qwen2_5_VLConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    text = dict(TEXT[preset])
    rope = dict(rope_type="default", rope_theta=1000000.0, mrope_section=text.pop("mrope_section"))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            rope_parameters=rope,
            max_position_embeddings=128000,
            sliding_window=32768,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(**VISION[preset], **VISION_COMMON),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_in_memory(
    family: str,
    preset: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    with_processor: bool = True,
) -> DiffusionPipeline:
    """The pipeline object, weights already on `device` in `dtype` (nothing is kept on disk)."""
    layered = family == "qwen-image-layered"
    model = partial(random_model, seed=seed, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_qwen2_tokenizer(Path(tmp))
    text_config = _text_encoder_config(preset, tokenizer)
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=model(lambda: AutoencoderKLQwenImage(**VAE[preset], input_channels=4 if layered else 3), component="vae"),
        text_encoder=model(lambda: Qwen2_5_VLForConditionalGeneration(text_config), component="text_encoder"),
        tokenizer=tokenizer,
        transformer=model(
            lambda: QwenImageTransformer2DModel(
                **TRANSFORMER[preset], use_additional_t_cond=layered, use_layer3d_rope=layered
            ),
            component="transformer",
        ),
    )
    if family != "qwen-image":
        with tempfile.TemporaryDirectory() as tmp:
            _write_processor(Path(tmp), tokenizer)
            components["processor"] = load_processor(tmp) if with_processor else None
    return PIPELINES[family](**components)


def build(out: Path, *, family: str, preset: str, seed: int, device: str | torch.device = "cpu") -> None:
    pipe = build_in_memory(family, preset, seed, SAVE_DTYPE[preset], device, with_processor=False)
    pipe.save_pretrained(out)
    if family != "qwen-image":
        _write_processor(out / "processor", pipe.tokenizer)
        index = json.loads((out / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
