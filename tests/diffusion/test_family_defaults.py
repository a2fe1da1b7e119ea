"""Each family's own defaults and derived values, on its real (tiny) pipeline."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.diffusion import SamplingParams


def test_qwen_image_defaults(pipeline):
    r = pipeline("qwen-image").resolve(SamplingParams(prompt="p", negative_prompt=" "))
    assert r.num_inference_steps == 50 and r.true_cfg_scale == 4.0 and r.negative_prompt == " "
    assert (r.height, r.width) == (1024, 1024) and r.max_sequence_length == 512


def test_qwen_image_reports_true_cfg_off_without_a_negative_prompt(pipeline):
    # diffusers runs true CFG only with a negative prompt and a scale > 1: otherwise
    # neither is used, and the resolved (reported) parameters say so.
    pipe = pipeline("qwen-image")
    assert pipe.resolve(SamplingParams(prompt="p")).true_cfg_scale is None
    assert pipe.resolve(SamplingParams(prompt="p", true_cfg_scale=6.0)).true_cfg_scale is None
    r = pipe.resolve(SamplingParams(prompt="p", negative_prompt="blur", true_cfg_scale=1.0))
    assert r.true_cfg_scale is None and r.negative_prompt is None


def test_wan_reports_cfg_off_when_guidance_scale_is_at_most_one(pipeline):
    r = pipeline("wan2.2-t2v").resolve(SamplingParams(prompt="p", negative_prompt="n", guidance_scale=1.0))
    assert r.guidance_scale == 1.0 and r.guidance_scale_2 is None and r.negative_prompt is None


def test_qwen_image_size_rounds_to_the_latent_grid(pipeline):
    r = pipeline("qwen-image").resolve(SamplingParams(prompt="p", height=70, width=100))
    assert (r.height, r.width) == (64, 96)


def test_qwen_image_edit_size_follows_the_input_image(pipeline, rgb_image):
    pipe = pipeline("qwen-image-edit")
    r = pipe.resolve(SamplingParams(prompt="p", images=[rgb_image]))  # 64x48 (4:3)
    assert (r.width, r.height) == (1184, 896)
    r = pipe.resolve(SamplingParams(prompt="p", images=[rgb_image], height=64))
    assert r.height == 64 and r.width == 1184
    with pytest.raises(ValueError, match="input image"):
        pipe.resolve(SamplingParams(prompt="p"))


def test_qwen_image_layered_defaults_and_rgba(pipeline, rgb_image):
    r = pipeline("qwen-image-layered").resolve(SamplingParams(prompt="p", images=[rgb_image]))
    assert r.layers == 4 and r.resolution == 640 and r.extra["cfg_normalize"] is False
    assert r.images[0].mode == "RGBA" and rgb_image.mode == "RGB"  # converted, caller's image untouched


def test_wan22_omitting_num_inference_steps_gives_40_not_50(pipeline):
    r = pipeline("wan2.2-t2v").resolve(SamplingParams(prompt="p"))
    assert r.num_inference_steps == 40
    assert (r.height, r.width, r.num_frames, r.fps) == (480, 832, 81, 16)


def test_wan22_omitting_guidance_scale_keeps_cfg_on_for_the_low_noise_expert(pipeline):
    r = pipeline("wan2.2-t2v").resolve(SamplingParams(prompt="p"))
    assert r.guidance_scale == 4.0 and r.guidance_scale_2 == 3.0  # never 0 / None


def test_wan22_guidance_scale_2_follows_an_explicit_guidance_scale(pipeline):
    pipe = pipeline("wan2.2-t2v")
    assert pipe.resolve(SamplingParams(prompt="p", guidance_scale=6.0)).guidance_scale_2 == 6.0
    assert pipe.resolve(SamplingParams(prompt="p"), {"guidance_scale": 5.0}).guidance_scale_2 == 5.0
    r = pipe.resolve(SamplingParams(prompt="p", guidance_scale=6.0, guidance_scale_2=2.0))
    assert (r.guidance_scale, r.guidance_scale_2) == (6.0, 2.0)


def test_wan22_cfg_layout_switches_scale_with_the_expert(pipeline):
    pipe = pipeline("wan2.2-t2v")
    r = pipe.resolve(SamplingParams(prompt="p", height=32, width=48, num_frames=5, num_inference_steps=4, seed=0))
    state = pipe.prepare(r, "x")
    assert state.extras["high_noise"] == (True, True, False, False)  # timesteps 999, 900 | 750, 500
    assert state.cfg.scales == (4.0, 4.0, 3.0, 3.0)


def test_wan22_frames_round_to_the_vae_stride(pipeline):
    assert pipeline("wan2.2-t2v").resolve(SamplingParams(prompt="p", num_frames=8)).num_frames == 9


def test_wan22_i2v_defaults(pipeline, rgb_image):
    r = pipeline("wan2.2-i2v").resolve(SamplingParams(prompt="p", images=[rgb_image]))
    assert r.num_inference_steps == 40 and r.guidance_scale == r.guidance_scale_2 == 3.5
