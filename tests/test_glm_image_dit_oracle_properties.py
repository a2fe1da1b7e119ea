"""Property-based oracle for GLM-Image's DiT stage over two checkpoints: our stage == diffusers.

tests/test_glm_image_oracle_properties.py samples the whole pipeline (AR stage in vLLM
included) on one checkpoint: a second one would cost another AR engine start. This
samples the DiT stage -- the part whose weights differ most between checkpoints --
on two (factory seeds 0 and 1) without an engine: prior tokens drawn from the
codebook, handed to our stage as its typed input (`GlmImagePrior`) and to diffusers'
`GlmImagePipeline` as `prior_token_ids` (upsampled x2 as its own AR step does), with
prompts with and without quoted text (the ByT5 glyph path) and non-ASCII, sizes on
the 32-px grid, guidance on and off. Both run float32, the CPU default
(orchestrator/stage_dtype.py), so the oracle is exact.

Examples: `EXAMPLES` (4); pipelines loaded once per checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_glm_image_oracle_properties import prompts  # the same prompt space as the whole-pipeline oracle
from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.families.glm_image.pipeline import GlmImagePrior, load_glm_image_pipeline

EXAMPLES = 4
STEPS = 2


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from diffusers import GlmImagePipeline

    cache: dict[int, tuple] = {}

    def get(ckpt_seed: int):
        if ckpt_seed not in cache:
            path = checkpoint("glm-image", seed=ckpt_seed)
            ref = GlmImagePipeline.from_pretrained(str(path), dtype=torch.float32)
            ref.set_progress_bar_config(disable=True)
            cache[ckpt_seed] = (load_glm_image_pipeline(path), ref)  # ours: no dtype, the default
        return cache[ckpt_seed]

    return get


def _ours(stage, prompt: str, prior: GlmImagePrior, seed: int, guidance: float) -> np.ndarray:
    h, w = prior.grid
    params = stage.resolve(SamplingParams(prompt=prompt, height=h * 32, width=w * 32, num_inference_steps=STEPS,
                                          guidance_scale=guidance, seed=seed))
    state = stage.prepare(params, prior.request_id, stage_input=prior)
    with torch.no_grad():
        while not state.done:
            stage.scheduler_step([state], stage.denoise_step([state]))
    return np.asarray(stage.decode(state).images[0])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, seed=st.integers(0, 2**31 - 1), grid=st.sampled_from([(8, 8), (8, 10), (12, 8)]),
       guidance=st.sampled_from([1.0, 1.5, 4.0]), ckpt_seed=st.sampled_from([0, 1]), data=st.data())
def test_dit_stage_equals_diffusers_on_two_checkpoints(loaded, prompt, seed, grid, guidance, ckpt_seed, data):
    stage, ref = loaded(ckpt_seed)
    assert stage.pipe.transformer.dtype == torch.float32  # the default on CPU
    codebook = ref.transformer.config.prior_vq_quantizer_codebook_size
    h, w = grid
    tokens = data.draw(st.lists(st.integers(0, codebook - 1), min_size=h * w, max_size=h * w), label="prior tokens")
    prior = GlmImagePrior("oracle", tuple(tokens), grid)
    ours = _ours(stage, prompt, prior, seed, guidance)
    upsampled = ref._upsample_token_ids(torch.tensor(tokens).view(1, -1), h, w)
    theirs = ref(prompt=prompt, height=h * 32, width=w * 32, num_inference_steps=STEPS, guidance_scale=guidance,
                 generator=torch.Generator("cpu").manual_seed(seed), prior_token_ids=upsampled,
                 output_type="pil").images[0]
    assert ours.shape == (h * 32, w * 32, 3) and ours.std() > 1
    np.testing.assert_array_equal(ours, np.asarray(theirs))
