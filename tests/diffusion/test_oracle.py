"""Oracle: each step-wise pipeline == the diffusers pipeline's own __call__ (same checkpoint, seed, params).

With batch_cfg=False our forwards are exactly diffusers' (cond, then uncond): the
pixels are bit-identical. With batch_cfg=True (the default) cond and uncond rows of
a small request share one forward with padded, masked text: float results move by
~1e-6 (GEMM blocking depends on the batch; masked softmax sums in another order),
which can flip a uint8 rounding: tolerance 1 level.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import SamplingParams

QWEN_T2I = dict(prompt="a red cat on a mat", negative_prompt="blurry", height=64, width=96, num_inference_steps=3,
                true_cfg_scale=4.0)


@pytest.mark.parametrize("batch_cfg,tol", [(False, 0), (True, 1)])
def test_qwen_image_matches_diffusers(pipeline, batch_cfg, tol):
    ours = pipeline("qwen-image", batch_cfg=batch_cfg)
    ref = ours.pipe(**QWEN_T2I, num_images_per_prompt=2, generator=seeded(7), output_type="np").images
    out = ours.generate(SamplingParams(**QWEN_T2I, num_outputs_per_prompt=2, seed=7, output_type="np"))
    assert len(out.images) == 2
    assert_pixels_close(np.stack(out.images), ref, tol)


def test_qwen_image_without_cfg_matches_diffusers(pipeline):
    ours = pipeline("qwen-image")
    kw = dict(prompt="no negative prompt: no CFG", height=64, width=64, num_inference_steps=2)
    ref = ours.pipe(**kw, generator=seeded(3), output_type="np").images
    out = ours.generate(SamplingParams(**kw, seed=3, output_type="np"))
    assert out.params.negative_prompt is None
    assert_pixels_close(np.stack(out.images), ref, 0)


def test_qwen_image_pil_output(pipeline):
    ours = pipeline("qwen-image", batch_cfg=False)
    ref = ours.pipe(**QWEN_T2I, generator=seeded(1)).images[0]
    out = ours.generate(SamplingParams(**QWEN_T2I, seed=1))
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref))


def test_qwen_image_edit_matches_diffusers(pipeline, rgb_image):
    ours = pipeline("qwen-image-edit", batch_cfg=False)
    kw = dict(prompt="make it red", negative_prompt=" ", height=64, width=96, num_inference_steps=2,
              true_cfg_scale=4.0)
    ref = ours.pipe(image=rgb_image, **kw, generator=seeded(7), output_type="np").images
    out = ours.generate(SamplingParams(**kw, images=[rgb_image], seed=7, output_type="np"))
    assert_pixels_close(np.stack(out.images), ref, 0)


def test_qwen_image_layered_matches_diffusers(pipeline, rgb_image):
    ours = pipeline("qwen-image-layered", batch_cfg=False)
    kw = dict(prompt="two layers", negative_prompt=" ", num_inference_steps=2, true_cfg_scale=4.0, layers=1)
    ref = ours.pipe(image=rgb_image.convert("RGBA"), **kw, resolution=640, generator=seeded(7), output_type="np")
    out = ours.generate(SamplingParams(**kw, images=[rgb_image], seed=7, output_type="np"))  # RGB in: -> RGBA
    assert len(out.layers) == 1 and len(out.layers[0]) == 1 and out.layers[0][0].shape[-1] == 4
    assert_pixels_close(np.stack(out.layers[0]), np.stack(ref.images[0]), 0)


WAN = dict(prompt="a dog runs", negative_prompt="static", height=32, width=48, num_frames=5, num_inference_steps=4,
           guidance_scale=4.0, guidance_scale_2=2.0)


@pytest.mark.parametrize("batch_cfg,tol", [(False, 0), (True, 1)])
def test_wan22_t2v_matches_diffusers(pipeline, batch_cfg, tol):
    ours = pipeline("wan2.2-t2v", batch_cfg=batch_cfg)
    ref = ours.pipe(**WAN, generator=seeded(7), output_type="np").frames
    out = ours.generate(SamplingParams(**WAN, seed=7, output_type="np"))
    assert out.kind == "video" and out.fps == 16 and len(out.videos[0]) == 5
    assert_pixels_close(np.asarray(out.videos), ref, tol)


def test_wan22_i2v_matches_diffusers(pipeline, rgb_image):
    ours = pipeline("wan2.2-i2v", batch_cfg=False)
    ref = ours.pipe(image=rgb_image, **WAN, generator=seeded(5), output_type="np").frames
    out = ours.generate(SamplingParams(**WAN, images=[rgb_image], seed=5, output_type="np"))
    assert_pixels_close(np.asarray(out.videos), ref, 0)


def test_wan22_omitted_guidance_matches_diffusers_with_model_card_scales(pipeline):
    ours = pipeline("wan2.2-t2v", batch_cfg=False)
    kw = {k: v for k, v in WAN.items() if not k.startswith("guidance")}
    ref = ours.pipe(**kw, guidance_scale=4.0, guidance_scale_2=3.0, generator=seeded(2), output_type="np").frames
    out = ours.generate(SamplingParams(**kw, seed=2, output_type="np"))
    assert_pixels_close(np.asarray(out.videos), ref, 0)


def test_generic_fallback_matches_diffusers(pipeline):
    ours = pipeline("qwen-image", generic=True)
    assert ours.monolithic
    steps = []
    out = ours.run_whole(ours.resolve(SamplingParams(**QWEN_T2I, seed=4, output_type="np")), "g",
                         lambda rid, i, n: steps.append((i, n)))
    ref = ours.pipe(**QWEN_T2I, generator=seeded(4), output_type="np").images
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert_pixels_close(np.stack(out.images), ref, 0)
    assert ours.resolve(SamplingParams(prompt="p")).num_inference_steps == 50  # from diffusers' signature
