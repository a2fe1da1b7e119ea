"""BAGEL through the multi-stage Omni: AR stage on vLLM -> prompt KV + keyed metadata through
OmniKVConnector -> DiT stage. Oracle: the independent full-sequence reference
(tests/reference/bagel_generation.py), which never sees a KV cache or vLLM.

Tolerance as in test_bagel_generation.py: at most 1 uint8 level on under 1% of the values
(float32 on both sides in different orders; BAGEL's uint8 conversion truncates). Here the
context KV also comes from vLLM's paged cache (its own kernels), measured within 1e-4 of the
stage's own prefill in test_kv_connector.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from reference.bagel_generation import BagelReference
from test_bagel_generation import STEPS, _close
from vllm_omni_plugin.diffusion.params import SamplingParams

TEXT_PROMPT = "<|im_start|>user\nDescribe a red cat.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ref(checkpoint):
    return BagelReference(checkpoint("bagel"))


def _image(omni, **kw) -> np.ndarray:
    (out,) = omni.generate([kw.pop("prompt")], SamplingParams(num_inference_steps=STEPS, **kw))
    return np.asarray(out.images[0])


def test_text2img_through_ar_stage_matches_reference(bagel_omni, ref):
    ours = _image(bagel_omni, prompt="a red cat", height=64, width=48, seed=1, extra={"timestep_shift": 1.0})
    _close(ours, ref.generate("a red cat", height=64, width=48, seed=1, steps=STEPS, timestep_shift=1.0))
    assert ours.std() > 20


def test_negative_prompt_context_is_a_second_ar_prefill(bagel_omni, ref):
    ours = _image(bagel_omni, prompt="a red cat", negative_prompt="blurry", height=32, width=32, seed=3)
    _close(ours, ref.generate("a red cat", negative_prompt="blurry", height=32, width=32, seed=3, steps=STEPS))


def test_concurrent_requests_get_their_own_contexts(bagel_omni):
    # Different prompt lengths and sizes, submitted together: each must equal its solo run.
    a = dict(prompt="a red cat sitting on a blue chair in the sun", height=32, width=48, seed=5)
    b = dict(prompt="a dog", height=48, width=32, seed=6)
    together = bagel_omni.generate(
        [a["prompt"], b["prompt"]],
        [SamplingParams(num_inference_steps=STEPS, **{k: v for k, v in x.items() if k != "prompt"}) for x in (a, b)],
    )
    for out, alone in zip(together, (_image(bagel_omni, **dict(a)), _image(bagel_omni, **dict(b)))):
        np.testing.assert_array_equal(np.asarray(out.images[0]), alone)


def test_text_answers_equal_plain_vllm(bagel_omni, bagel_llm):
    from vllm import SamplingParams as VllmSamplingParams

    greedy = VllmSamplingParams(temperature=0.0, max_tokens=8)
    (ours,) = bagel_omni.generate_text([{"prompt": TEXT_PROMPT}], greedy)
    (plain,) = bagel_llm.generate([TEXT_PROMPT], greedy)
    assert list(ours.outputs[0].token_ids) == list(plain.outputs[0].token_ids)


def test_a_failing_request_does_not_take_others_down(bagel_omni):
    stages = bagel_omni._stages

    async def both():
        bad = stages.generate_image(SamplingParams(prompt="x", height=40, width=40, num_inference_steps=2))
        good = stages.generate_image(SamplingParams(prompt="a cat", height=32, width=32, num_inference_steps=2, seed=0))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = bagel_omni._background.run(both())
    assert isinstance(bad, ValueError) and "40" in str(bad)
    assert np.asarray(good.images[0]).shape == (32, 32, 3)
    # ...and the pipeline keeps serving, with nothing left behind in the hand-over store.
    assert _image(bagel_omni, prompt="again", height=32, width=32, seed=0).shape == (32, 32, 3)
    assert len(stages.pipeline.contexts) == 0
