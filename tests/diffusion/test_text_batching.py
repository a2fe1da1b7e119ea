"""Text encoding of requests admitted together: one text-encoder call, per-request results.

`encode_texts` is diffusers' own list-of-prompts encoding (right-padded, one call),
deduplicated and cut back per text. Against each text encoded alone it moves floats
by ~1e-6 on CPU float32 (the encoder's kernels see another batch shape; the padding
itself is masked and comes after each text under causal attention): tolerance 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams

TEXTS = ["a red cat on a mat", "blurry", "a much longer prompt about a blue dog on a beach at sunset", " "]


class EncoderCalls:
    """Counts text-encoder calls and the batch size of each."""

    def __init__(self, pipe):
        self.batches: list[int] = []
        self._handle = pipe.pipe.text_encoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(kwargs["input_ids"].shape[0])

    def close(self):
        self._handle.remove()


@pytest.fixture
def encoder_calls(pipeline):
    calls = EncoderCalls(pipeline("qwen-image"))
    yield calls
    calls.close()


def req(prompt, seed, **kw):
    return SamplingParams(prompt=prompt, height=32, width=64, num_inference_steps=2, seed=seed, output_type="np",
                          **kw)


def test_batched_encoding_equals_per_request_encoding(pipeline, encoder_calls):
    ours = pipeline("qwen-image")
    ours.clear_prompt_cache()
    dev = torch.device("cpu")
    with torch.no_grad():
        batched = ours.encode_texts(TEXTS + [TEXTS[0]])  # a duplicate is encoded once
        assert encoder_calls.batches == [len(TEXTS)]
        listed, listed_mask = ours.pipe.encode_prompt(TEXTS, device=dev, max_sequence_length=512)
        for i, text in enumerate(TEXTS):
            alone, alone_mask = ours.pipe.encode_prompt(text, device=dev, max_sequence_length=512)
            assert alone_mask is None
            assert batched[text].shape == alone.shape  # cut back to its own length: no padding left
            assert torch.equal(batched[text], listed[i : i + 1, : int(listed_mask[i].sum())])  # diffusers' batch
            torch.testing.assert_close(batched[text], alone, rtol=0, atol=1e-5)
    assert len(ours._prompt_cache) == 0  # batch encodings serve their batch only


def test_engine_encodes_all_admitted_prompts_in_one_call(pipeline, encoder_calls):
    ours = pipeline("qwen-image")
    ours.clear_prompt_cache()
    engine = DiffusionEngine(ours)
    for i, prompt in enumerate(TEXTS[:3] + ["a third prompt"]):
        engine.add_request(f"d{i}", req(prompt, i, negative_prompt=" ", true_cfg_scale=4.0))
    final = engine.run()
    assert all(e.kind == "finished" for e in final.values())
    assert encoder_calls.batches == [5]  # 4 prompts + the shared negative, one call

    encoder_calls.batches.clear()
    engine = DiffusionEngine(ours)
    for i in range(4):  # identical prompts: deduplicated
        engine.add_request(f"s{i}", req("the same prompt", i, negative_prompt=" ", true_cfg_scale=4.0))
    engine.run()
    assert encoder_calls.batches == [2]


def test_identical_and_equal_length_prompts_share_unmasked_forwards(pipeline, monkeypatch):
    ours = pipeline("qwen-image")
    monkeypatch.setattr(ours, "small_forward_tokens", 0)  # no merging of small forwards: one per text layout
    masks = []

    def record(module, args, kwargs):
        masks.append((kwargs["encoder_hidden_states"].shape[0], kwargs["encoder_hidden_states_mask"] is None))

    handle = ours.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    tok = ours.pipe.tokenizer
    same_length = ["a red cat", "a red car"]  # distinct texts, equal token counts
    assert len(tok(same_length[0]).input_ids) == len(tok(same_length[1]).input_ids)
    try:
        for prompts in (["one prompt"] * 3, same_length):
            masks.clear()
            engine = DiffusionEngine(ours)
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", req(p, i, negative_prompt=" ", true_cfg_scale=4.0))
            engine.run()
            # per step: all cond rows in one unmasked forward, all uncond rows in another
            assert masks == [(len(prompts), True)] * 4, masks
    finally:
        handle.remove()


def test_generate_stays_bit_exact_after_batched_admission(pipeline):
    """Batch encodings never enter the prompt cache: a later generate() is still diffusers' own result."""
    ours = pipeline("qwen-image", batch_cfg=False)
    kw = dict(prompt="a red cat on a mat", negative_prompt="blurry", height=64, width=96, num_inference_steps=2,
              true_cfg_scale=4.0)
    engine = DiffusionEngine(ours)
    engine.add_request("a", SamplingParams(**kw, seed=1))
    engine.add_request("b", SamplingParams(**{**kw, "prompt": "another, longer prompt than the first"}, seed=2))
    engine.run()
    ref = ours.pipe(**kw, generator=seeded(7), output_type="np").images
    out = ours.generate(SamplingParams(**kw, seed=7, output_type="np"))
    assert_pixels_close(np.stack(out.images), ref, 0)


def test_a_failing_request_in_an_admitted_batch_fails_alone(pipeline, monkeypatch):
    ours = pipeline("qwen-image")
    prepare = ours._prepare

    def failing(params, request_id, encoded=None):
        if request_id == "bad":
            raise RuntimeError("boom")
        return prepare(params, request_id, encoded)

    monkeypatch.setattr(ours, "_prepare", failing)
    engine = DiffusionEngine(ours)
    for rid in ("a", "bad", "c"):
        engine.add_request(rid, req(f"prompt {rid}", 1))
    final = engine.run()
    assert final["bad"].kind == "error" and "boom" in str(final["bad"].error)
    assert final["a"].kind == final["c"].kind == "finished"


def test_processor_fallback_lives_in_the_diffusion_package():
    from vllm_omni_plugin.families.qwen_image import checkpoint as factory
    from vllm_omni_plugin.diffusion import processors

    assert factory.load_processor is processors.load_processor
    assert processors.Qwen2VLImageOnlyProcessor.__module__ == "vllm_omni_plugin.diffusion.processors"


def test_execution_device_is_looked_up_once(pipeline, monkeypatch):
    """diffusers' `_execution_device` walks every module (~9 ms on the full model); prepare asks per request."""
    ours = pipeline("qwen-image")
    ours.device  # looked up (cached) here

    def walk(self):
        raise AssertionError("_execution_device looked up again")

    monkeypatch.setattr(type(ours.pipe), "_execution_device", property(walk))
    engine = DiffusionEngine(ours)
    for i in range(2):
        engine.add_request(f"r{i}", req(f"prompt {i}", i, negative_prompt=" ", true_cfg_scale=4.0))
    assert all(e.kind == "finished" for e in engine.run().values())
