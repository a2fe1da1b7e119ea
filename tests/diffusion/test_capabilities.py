"""Families declare what they make, take and read; resolve() and the engine enforce it.

Real pipelines on tiny checkpoints; Qwen-Image-Edit Plus (several input images)
is checked bit for bit against diffusers' QwenImageEditPlusPipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams
from vllm_omni_plugin.diffusion.capabilities import Capabilities, Knob, UnsupportedField

DECLARED = {
    # family: (output, input images, reads, does not read)
    "qwen-image": ("image", (0, 0), {"negative_prompt", "true_cfg_scale", "height"}, {"guidance_scale", "num_frames"}),
    "qwen-image-edit": ("image", (1, 1), {"true_cfg_scale", "height"}, {"guidance_scale", "layers"}),
    "qwen-image-edit-plus": ("image", (1, None), {"true_cfg_scale", "width"}, {"guidance_scale", "fps"}),
    "qwen-image-layered": ("layers", (1, 1), {"layers", "resolution", "cfg_normalize"}, {"height", "width"}),
    "wan2.2-t2v": ("video", (0, 0), {"guidance_scale", "guidance_scale_2", "num_frames", "fps"}, {"true_cfg_scale"}),
    "wan2.2-i2v": ("video", (1, 1), {"guidance_scale_2", "num_frames"}, {"true_cfg_scale", "layers"}),
}


@pytest.mark.parametrize("family", sorted(DECLARED))
def test_each_family_declares_what_it_does(pipeline, family):
    output, images, reads, ignores = DECLARED[family]
    caps = pipeline(family).capabilities
    assert caps.output == output and caps.input_images == images
    assert reads <= caps.honoured and not ignores & caps.honoured
    assert caps.orchestrator is None and not caps.text_output  # single-stage: runs inline


def test_a_field_the_model_does_not_read_is_refused_by_name(pipeline, rgb_image):
    with pytest.raises(UnsupportedField) as e:
        pipeline("qwen-image").resolve(SamplingParams(prompt="p", guidance_scale=3.0))  # not guidance-distilled
    assert e.value.field == "guidance_scale" and "guidance_scale" in str(e.value)
    with pytest.raises(UnsupportedField) as e:
        pipeline("qwen-image-layered").resolve(SamplingParams(prompt="p", images=[rgb_image], height=64))
    assert e.value.field == "height"
    with pytest.raises(UnsupportedField) as e:  # a knob of another family
        pipeline("qwen-image").resolve(SamplingParams(prompt="p", extra={"cfg_normalize": True}))
    assert e.value.field == "cfg_normalize"


def test_input_image_counts_follow_the_declaration(pipeline, rgb_image):
    with pytest.raises(UnsupportedField, match="exactly 1 input image, got 2"):
        pipeline("qwen-image-edit").resolve(SamplingParams(prompt="p", images=[rgb_image, rgb_image]))
    with pytest.raises(UnsupportedField, match="no input image, got 1"):
        pipeline("qwen-image").resolve(SamplingParams(prompt="p", images=[rgb_image]))
    r = pipeline("qwen-image-edit-plus").resolve(SamplingParams(prompt="p", images=[rgb_image] * 3))
    assert len(r.images) == 3


def test_stage_defaults_the_model_does_not_read_are_refused_at_start(pipeline):
    with pytest.raises(UnsupportedField, match="the stage defaults sets `num_frames`"):
        DiffusionEngine(pipeline("qwen-image"), stage_defaults={"num_frames": 5})


def test_generic_fallback_declares_from_the_diffusers_signature(pipeline):
    caps = pipeline("wan2.2-t2v", generic=True).capabilities
    assert caps.output == "video" and caps.input_images == (0, 0)
    assert {"guidance_scale", "guidance_scale_2", "num_frames", "fps"} <= caps.fields
    assert "true_cfg_scale" not in caps.fields
    caps = pipeline("qwen-image-edit", generic=True).capabilities
    assert caps.takes_images and caps.output == "image"


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="output"):
        Capabilities(output="audio")
    with pytest.raises(ValueError, match="unknown SamplingParams"):
        Capabilities(output="image", fields=frozenset({"guidance"}))
    with pytest.raises(TypeError, match="length"):
        Knob(tuple)


def _two_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8))]


def test_qwen_image_edit_plus_matches_diffusers_with_two_images(pipeline):
    ours = pipeline("qwen-image-edit-plus", batch_cfg=False)
    images = _two_images()
    kw = dict(prompt="put the cat from picture 1 on the mat of picture 2", negative_prompt=" ", height=64, width=64,
              num_inference_steps=2, true_cfg_scale=4.0)
    ref = ours.pipe(image=images, **kw, generator=seeded(7), output_type="np").images
    out = ours.generate(SamplingParams(**kw, images=images, seed=7, output_type="np"))
    assert_pixels_close(np.stack(out.images), ref, 0)
    # the default size follows the LAST image (diffusers' rule for Edit Plus): 40x64 -> ~1024^2 at 5:8
    assert ours.resolve(SamplingParams(prompt="p", images=images)).width == 800
