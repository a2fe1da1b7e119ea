"""FLUX.1 and FLUX.1 Kontext: the step-wise pipelines == diffusers' own `__call__` on the same tiny checkpoint.

The checkpoint is the factory's tiny FLUX.1-dev layout (families/flux/checkpoint.py), loaded
through the loader real checkpoints take and served by the class the family registry names.
Pixels are equal to the bit (CPU float32): with batch_cfg=False our forwards are diffusers'
forwards. Where rows of several requests (or CFG's two branches) share one forward, the GEMMs
see another batch size and floats move by ~1e-6; a uint8 rounding may flip: tolerance 1 level.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams
from vllm_omni_plugin.diffusion.capabilities import UnsupportedField
from vllm_omni_plugin.families.flux.pipeline import FluxKontextStepwise, FluxStepwise

SMALL = dict(height=64, width=96, num_inference_steps=3, max_sequence_length=32)


def _np(out) -> np.ndarray:
    return np.stack(out.images)


def test_registry_serves_flux_stepwise(pipeline):
    flux = pipeline("flux")
    assert type(flux) is FluxStepwise and not flux.monolithic
    assert flux.capabilities.output == "image" and not flux.capabilities.takes_images
    assert "guidance_scale" in flux.capabilities.honoured  # a guidance-distilled checkpoint


def test_defaults_are_diffusers_defaults(pipeline):
    """What a user gets with a prompt only: FLUX.1-dev's 28 steps, guidance 3.5, 512 T5 tokens, 1024x1024."""
    flux = pipeline("flux")
    p = flux.resolve(SamplingParams(prompt="a red cat", seed=1))
    assert (p.num_inference_steps, p.guidance_scale, p.max_sequence_length, p.height, p.width) == (28, 3.5, 512, 1024,
                                                                                                   1024)
    assert p.true_cfg_scale is None and p.negative_prompt is None  # no true CFG without a negative prompt


def test_omitted_values_match_diffusers_at_its_defaults(pipeline):
    """Steps, guidance and text length left out on both sides: diffusers' 28 steps, guidance 3.5 and
    512 T5 tokens run. The size is given: the default 1024x1024 (checked above, the same
    `default_sample_size * vae_scale_factor` diffusers computes) costs minutes of a shared CPU."""
    flux = pipeline("flux", batch_cfg=False)
    assert flux.resolve(SamplingParams(prompt="x")).height == flux.pipe.default_sample_size * flux.pipe.vae_scale_factor
    kw = dict(prompt="a red cat on a mat", height=32, width=48)
    ref = flux.pipe(**kw, generator=seeded(5), output_type="np").images
    out = flux.generate(SamplingParams(**kw, seed=5, output_type="np"))
    assert (out.params.num_inference_steps, out.params.guidance_scale, out.params.max_sequence_length) == (28, 3.5, 512)
    assert_pixels_close(_np(out), ref, 0)


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_explicit_values_and_n_match_diffusers(pipeline, batch_cfg):
    flux = pipeline("flux", batch_cfg=batch_cfg)
    kw = dict(prompt="a dog running on the beach", guidance_scale=5.0, **SMALL)
    ref = flux.pipe(**kw, num_images_per_prompt=2, generator=seeded(7), output_type="np").images
    out = flux.generate(SamplingParams(**kw, num_outputs_per_prompt=2, seed=7, output_type="np"))
    assert len(out.images) == 2 and out.images[0].shape == (64, 96, 3)
    assert_pixels_close(_np(out), ref, 0)  # one branch: the same forward whatever batch_cfg says


@pytest.mark.parametrize("batch_cfg,tol", [(False, 0), (True, 1)])
def test_true_cfg_with_negative_prompt_matches_diffusers(pipeline, batch_cfg, tol):
    flux = pipeline("flux", batch_cfg=batch_cfg)
    kw = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=3.0, height=48, width=64,
              num_inference_steps=2, max_sequence_length=24)
    ref = flux.pipe(**kw, generator=seeded(3), output_type="np").images
    out = flux.generate(SamplingParams(**kw, seed=3, output_type="np"))
    assert out.params.true_cfg_scale == 3.0 and out.params.negative_prompt == "blurry"
    assert_pixels_close(_np(out), ref, tol)


def test_negative_prompt_without_scale_runs_no_cfg_as_diffusers(pipeline):
    """true_cfg_scale defaults to 1: diffusers ignores the negative prompt; we report both as not run."""
    flux = pipeline("flux")
    kw = dict(prompt="a red cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    ref = flux.pipe(**kw, negative_prompt="blurry", generator=seeded(2), output_type="np").images
    out = flux.generate(SamplingParams(**kw, negative_prompt="blurry", seed=2, output_type="np"))
    assert out.params.true_cfg_scale is None and out.params.negative_prompt is None
    assert_pixels_close(_np(out), ref, 0)


def test_pil_output_and_size_rounding_match_diffusers(pipeline):
    flux = pipeline("flux")
    kw = dict(prompt="a house", height=70, width=50, num_inference_steps=2, max_sequence_length=16)
    ref = flux.pipe(**kw, generator=seeded(4)).images[0]
    out = flux.generate(SamplingParams(**kw, seed=4))
    assert out.images[0].size == ref.size == (48, 64) and (out.params.width, out.params.height) == (48, 64)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref))


def test_refuses_what_flux_does_not_read(pipeline):
    flux = pipeline("flux")
    for field, kw in (("guidance_scale_2", dict(guidance_scale_2=2.0)), ("num_frames", dict(num_frames=5)),
                      ("layers", dict(layers=2)), ("images", dict(images=[object()]))):
        with pytest.raises(UnsupportedField) as err:
            flux.resolve(SamplingParams(prompt="x", **kw))
        assert err.value.field == field
    with pytest.raises(ValueError, match="max_sequence_length must be an integer in"):
        flux.resolve(SamplingParams(prompt="x", max_sequence_length=513))


def test_concurrent_requests_batched_equal_each_alone(pipeline):
    """Different prompts, seeds and sizes admitted together: same-size rows share forwards, each
    image equals that request run alone (generate(), bit-exact against diffusers above)."""
    flux = pipeline("flux")
    requests = {
        "a": SamplingParams(prompt="a red cat", seed=1, **SMALL),
        "b": SamplingParams(prompt="a much longer prompt about a blue dog on a beach", seed=2, **SMALL),
        "c": SamplingParams(prompt="mountains", seed=3, **{**SMALL, "height": 32, "width": 64}),
        "d": SamplingParams(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=2.0, seed=4,
                            num_outputs_per_prompt=2, **SMALL),
    }
    engine = DiffusionEngine(flux)
    for rid, req in requests.items():
        engine.add_request(rid, SamplingParams(**{**req.set_fields(), "output_type": "np"}))
    final = engine.run()
    assert max(engine.stats.batch_sizes) == 3  # a, b, d share every step; c (another grid) steps alone
    for rid, req in requests.items():
        alone = flux.generate(SamplingParams(**{**req.set_fields(), "output_type": "np"}))
        assert final[rid].kind == "finished"
        assert_pixels_close(np.stack(final[rid].output.images), _np(alone), 1)


# ---- Kontext ------------------------------------------------------------------------------


def test_kontext_edit_matches_diffusers(pipeline, rgb_image):
    kontext = pipeline("flux-kontext", batch_cfg=False)
    assert type(kontext) is FluxKontextStepwise and kontext.capabilities.input_images == (0, 1)
    kw = dict(prompt="make it red", num_inference_steps=2, max_sequence_length=16, max_area=64 * 64)
    ref = kontext.pipe(image=rgb_image, **kw, num_images_per_prompt=2, generator=seeded(7), output_type="np").images
    out = kontext.generate(SamplingParams.from_dict(dict(**kw, images=[rgb_image], num_outputs_per_prompt=2, seed=7,
                                                         output_type="np")))
    assert out.params.extra["max_area"] == 64 * 64 and out.params.height == out.params.width == 64
    assert_pixels_close(_np(out), ref, 0)


def test_kontext_without_image_and_with_size_matches_diffusers(pipeline):
    kontext = pipeline("flux-kontext", batch_cfg=False)
    kw = dict(prompt="a bowl of fruit", height=64, width=128, num_inference_steps=2, max_sequence_length=16,
              max_area=48 * 96, guidance_scale=2.5)
    ref = kontext.pipe(**kw, generator=seeded(9), output_type="np").images
    out = kontext.generate(SamplingParams.from_dict(dict(**kw, seed=9, output_type="np")))
    assert out.images[0].shape == ref[0].shape
    assert_pixels_close(_np(out), ref, 0)


def test_kontext_concurrent_edits_batched_equal_each_alone(pipeline, rgb_image):
    """Two edits of same-sized images (different prompts and seeds) share every forward (the
    condition grid is part of the batch key); a text-only Kontext request steps alone."""
    kontext = pipeline("flux-kontext")
    common = dict(num_inference_steps=2, max_sequence_length=16, max_area=64 * 64, output_type="np")
    requests = {
        "a": dict(prompt="make it red", images=[rgb_image], seed=1, **common),
        "b": dict(prompt="make the sky purple", images=[rgb_image.rotate(180)], seed=2, **common),
        "c": dict(prompt="a blue house", seed=3, **common),
    }
    engine = DiffusionEngine(kontext)
    for rid, req in requests.items():
        engine.add_request(rid, SamplingParams.from_dict(req))
    final = engine.run()
    assert engine.stats.batch_sizes == [2, 1, 2, 1]
    for rid, req in requests.items():
        alone = kontext.generate(SamplingParams.from_dict(req))
        assert_pixels_close(np.stack(final[rid].output.images), _np(alone), 1)


def test_kontext_defaults_and_refusals(pipeline, rgb_image):
    kontext = pipeline("flux-kontext")
    p = kontext.resolve(SamplingParams(prompt="x", images=[rgb_image]))
    assert (p.num_inference_steps, p.guidance_scale, p.height, p.width, p.extra["max_area"]) == (28, 3.5, 1024, 1024,
                                                                                                 1024**2)
    with pytest.raises(UnsupportedField, match="at most 1 input image"):
        kontext.resolve(SamplingParams(prompt="x", images=[rgb_image, rgb_image]))
    with pytest.raises(ValueError, match="max_area must be a positive integer"):
        kontext.resolve(SamplingParams(prompt="x", extra={"max_area": 0}))
