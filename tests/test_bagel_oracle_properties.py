"""Property-based oracle for BAGEL's diffusion stage: our pipeline == the independent reference MoT.

Draws seeds, sizes BAGEL generates (multiples of 16: its VAE x8 and 2x2 latent
patches), prompts with and without quoted text and non-ASCII, a negative prompt
or none, and two checkpoints (factory seeds 0 and 1). The pipeline runs in the
CPU default dtype (float32, orchestrator/stage_dtype.py; the pinned dtype of the
oracle tests), the reference (tests/reference/bagel_generation.py) in float32;
tolerance as tests/test_bagel_generation.py states it (one level, <1% of values).
The AR stage's part (vLLM prefill == the reference's context) is covered by
tests/test_omni_bagel_*.py; this is the diffusion stage over sampled inputs.

Examples: `EXAMPLES` (4); pipelines and references are loaded once per checkpoint.
Measured on the shared 2-core CPU under heavy load (2026-12-02): 85 s for the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.bagel_generation import BagelReference
from test_bagel_generation import _close
from vllm_omni_plugin.diffusion import SamplingParams
from vllm_omni_plugin.families.bagel.pipeline import load_bagel_pipeline

EXAMPLES = 4
STEPS = 4  # flow times 1, .75, .5, .25 with shift 1: CFG on the first three, off on the last
prompts = st.builds(lambda w, q, n: w + q + n,
                    st.sampled_from(["a red cat", "a blue dog on a chair", "a lighthouse"]),
                    st.sampled_from(["", ' with a sign saying "OPEN"']),
                    st.sampled_from(["", " \u732b", " in K\u00f6ln"]))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    cache: dict[int, tuple] = {}

    def get(ckpt_seed: int):
        if ckpt_seed not in cache:
            path = checkpoint("bagel", seed=ckpt_seed)
            cache[ckpt_seed] = (load_bagel_pipeline(path, device="cpu"), BagelReference(path))
        return cache[ckpt_seed]

    return get


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, negative=st.sampled_from([None, "blurry"]), seed=st.integers(0, 2**31 - 1),
       height=st.sampled_from([32, 48, 64]), width=st.sampled_from([32, 48]), ckpt_seed=st.sampled_from([0, 1]))
def test_default_pipeline_equals_reference(loaded, prompt, negative, seed, height, width, ckpt_seed):
    pipe, ref = loaded(ckpt_seed)
    out = pipe.generate(SamplingParams(prompt=prompt, negative_prompt=negative, height=height, width=width,
                                       num_inference_steps=STEPS, seed=seed, extra={"timestep_shift": 1.0}))
    kw = {"negative_prompt": negative} if negative is not None else {}
    _close(np.asarray(out.images[0]), ref.generate(prompt, height=height, width=width, seed=seed, steps=STEPS,
                                                   timestep_shift=1.0, **kw))
