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

from batching import assert_batched_equals_alone
from reference.bagel_generation import BagelReference
from test_bagel_generation import STEPS, _close
from test_bagel_generation import _image as _input_image
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
        assert_batched_equals_alone(np.asarray(out.images[0]), alone)


def test_img2img_through_ar_stage_matches_reference(bagel_omni, ref):
    """img2img's three contexts (cond / cfg_text / cfg_img) are AR prefills; the edit image 56x40 is
    generated at 48x32 (BAGEL's input-size rule floored to /16), as the reference does."""
    from vllm_omni_plugin.families.bagel.orchestrator import StageTimings

    image = _input_image(0)
    timings = StageTimings()
    params = SamplingParams(prompt="make it blue", images=[image], num_inference_steps=STEPS, seed=2)
    out = bagel_omni._background.run(bagel_omni._stages.generate_image(params, timings=timings))
    assert (out.params.height, out.params.width) == (32, 48)
    assert timings.transferred_bytes > 0  # the contexts came from the AR stage, not the DiT stage's own prefill
    expected = ref.generate("make it blue", image=image, height=32, width=48, seed=2, steps=STEPS)
    _close(np.asarray(out.images[0]), expected)
    assert not bagel_omni._stages.engine.has_unfinished()  # the stage took the handed-over context with the request


def test_img2img_negative_prompt_is_in_the_cfg_text_prefill(bagel_omni, ref):
    image = _input_image(1, (32, 48))
    (out,) = bagel_omni.generate(["a cat"], SamplingParams(images=[image], negative_prompt="blurry", height=48, width=32,
                                                           num_inference_steps=STEPS, seed=4))
    expected = ref.generate("a cat", image=image, negative_prompt="blurry", height=48, width=32, seed=4, steps=STEPS)
    _close(np.asarray(out.images[0]), expected)


def test_concurrent_img2img_finishing_out_of_order_get_their_own_contexts(bagel_omni):
    """Two img2img requests with different input sizes: the first to arrive (more steps) finishes
    last; each gets its own size and the image it gets alone."""
    stages = bagel_omni._stages
    first = SamplingParams(prompt="a red cat on a chair", images=[_input_image(2, (64, 48))], num_inference_steps=12, seed=5)
    second = SamplingParams(prompt="blue", images=[_input_image(3, (32, 64))], num_inference_steps=3, seed=6)
    finished: list[str] = []

    async def run(rid: str, params: SamplingParams):
        out = await stages.generate_image(params, request_id=rid)
        finished.append(rid)
        return out

    async def both():
        a = asyncio.ensure_future(run("first", first))
        await asyncio.sleep(0)  # "first" reaches the AR stage first
        return await asyncio.gather(a, run("second", second))

    together = bagel_omni._background.run(both())
    assert finished == ["second", "first"]
    for out, params, size in zip(together, (first, second), ((48, 64), (64, 32))):
        assert (out.params.height, out.params.width) == size
        alone = bagel_omni._background.run(stages.generate_image(params))
        assert_batched_equals_alone(np.asarray(out.images[0]), np.asarray(alone.images[0]))
    assert not stages.engine.has_unfinished()  # no stage input left behind


def test_text_answers_equal_plain_vllm(bagel_omni, bagel_llm):
    from vllm import SamplingParams as VllmSamplingParams

    greedy = VllmSamplingParams(temperature=0.0, max_tokens=8)
    (ours,) = bagel_omni.generate_text([{"prompt": TEXT_PROMPT}], greedy)
    (plain,) = bagel_llm.generate([TEXT_PROMPT], greedy)
    assert list(ours.outputs[0].token_ids) == list(plain.outputs[0].token_ids)


def test_img2text_answers_equal_plain_vllm_with_the_omni_architecture(bagel_omni, bagel_kv_llm):
    # vLLM's own Bagel numbers image tokens one by one; the plugin's architecture uses BAGEL's
    # positions (test_omni_bagel_positions.py), so plain vllm.LLM() is compared with that architecture.
    from PIL import Image
    from vllm import SamplingParams as VllmSamplingParams

    llm, _ = bagel_kv_llm
    greedy = VllmSamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
    prompt = {"prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?"
                        "<|im_end|>\n<|im_start|>assistant\n",
              "multi_modal_data": {"image": Image.new("RGB", (64, 48), (200, 30, 30))}}
    (ours,) = bagel_omni.generate_text([prompt], greedy)
    (plain,) = llm.generate([prompt], greedy)
    assert list(ours.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    for a, b in zip(ours.outputs[0].logprobs, plain.outputs[0].logprobs):
        (tok,) = a.keys()
        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_a_failing_request_does_not_take_others_down(bagel_omni):
    stages = bagel_omni._stages

    async def both():
        bad = stages.generate_image(SamplingParams(prompt="x", height=40, width=40, num_inference_steps=2))
        good = stages.generate_image(SamplingParams(prompt="a cat", height=32, width=32, num_inference_steps=2, seed=0))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = bagel_omni._background.run(both())
    assert isinstance(bad, ValueError) and "40" in str(bad)
    assert np.asarray(good.images[0]).shape == (32, 32, 3)
    # ...and the pipeline keeps serving, with nothing left behind in the DiT stage.
    assert _image(bagel_omni, prompt="again", height=32, width=32, seed=0).shape == (32, 32, 3)
    assert not stages.engine.has_unfinished()  # no stage input left behind
