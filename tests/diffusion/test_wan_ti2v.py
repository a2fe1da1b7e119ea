"""Wan2.2 TI2V-5B (one checkpoint, text- and image-to-video, per-token timesteps) as a step-wise
pipeline == diffusers' WanPipeline / WanImageToVideoPipeline with `expand_timesteps` on the same
tiny checkpoint and seed; requests with and without an image batch together."""

from __future__ import annotations

import numpy as np
import pytest

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams

FAMILY = "wan2.2-ti2v-5b"
KW = dict(prompt="a dog runs", negative_prompt="static", height=32, width=64, num_frames=5, num_inference_steps=3,
          guidance_scale=4.0)


def test_declaration_and_model_card_defaults(pipeline, rgb_image):
    ours = pipeline(FAMILY)
    assert ours.family == "wan-ti2v" and not ours.monolithic
    caps = ours.capabilities
    assert caps.output == "video" and caps.input_images == (0, 1) and "guidance_scale_2" not in caps.fields
    r = ours.resolve(SamplingParams(prompt="p"))
    assert (r.num_inference_steps, r.guidance_scale, r.height, r.width, r.num_frames, r.fps) == (50, 5.0, 704, 1280,
                                                                                                121, 24)


@pytest.mark.parametrize("batch_cfg,tol", [(False, 0), (True, 1)])
def test_text_to_video_matches_diffusers(pipeline, batch_cfg, tol):
    ours = pipeline(FAMILY, batch_cfg=batch_cfg)
    ref = ours.pipe(**KW, generator=seeded(3), output_type="np").frames
    out = ours.generate(SamplingParams(**KW, seed=3, output_type="np"))
    assert out.kind == "video" and len(out.videos[0]) == 5
    assert_pixels_close(np.asarray(out.videos), ref, tol)


def test_image_to_video_matches_diffusers(pipeline, rgb_image):
    ours = pipeline(FAMILY, batch_cfg=False)
    ref = ours.image_pipe(image=rgb_image, **KW, generator=seeded(5), output_type="np").frames
    out = ours.generate(SamplingParams(**KW, images=[rgb_image], seed=5, output_type="np"))
    assert_pixels_close(np.asarray(out.videos), ref, 0)


def test_with_and_without_an_image_share_forwards(pipeline, rgb_image):
    ours = pipeline(FAMILY, batch_cfg=False)
    engine = DiffusionEngine(ours)
    engine.add_request("t2v", SamplingParams(**KW, seed=3, output_type="np"))
    engine.add_request("i2v", SamplingParams(**KW, images=[rgb_image], seed=5, output_type="np"))
    final = engine.run()
    assert max(engine.stats.batch_sizes) == 2  # one forward carried both requests
    alone = ours.generate(SamplingParams(**KW, images=[rgb_image], seed=5, output_type="np"))
    assert_pixels_close(np.asarray(final["i2v"].output.videos), np.asarray(alone.videos), 1)
