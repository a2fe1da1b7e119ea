"""A failure inside the engine fails only the request it belongs to.

The fault is injected into the real pipeline on the tiny checkpoint: the
named pipeline call raises whenever request "bad" is among its inputs (as a
kernel error caused by one request's shape or data would). The others in the
same batch must finish with the pixels they get without "bad" around.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixels import assert_pixels_close
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams


def req(prompt, seed, steps=2):
    return SamplingParams(prompt=prompt, height=32, width=32, num_inference_steps=steps, seed=seed, output_type="np")


def _request_ids(call: str, args: tuple) -> list[str]:
    if call == "prepare_many":  # prepare_many(params, request_ids)
        return list(args[1])
    return [state.request_id for state in args[0]]  # (states, ...)


@pytest.fixture(scope="module")
def reference(pipeline):
    engine = DiffusionEngine(pipeline("qwen-image"))
    for rid, params in GOOD.items():
        engine.add_request(rid, params)
    return {rid: np.stack(event.output.images) for rid, event in engine.run().items()}


GOOD = {"a": req("a red cat", 1), "c": req("a blue dog on a beach", 3)}


@pytest.mark.parametrize("call", ["prepare_many", "denoise_step", "scheduler_step", "decode_many"])
def test_a_raising_call_fails_only_its_request(pipeline, reference, monkeypatch, call):
    pipe = pipeline("qwen-image")
    original = getattr(pipe, call)

    def faulty(*args):
        if "bad" in _request_ids(call, args):
            raise RuntimeError(f"injected {call} failure")
        return original(*args)

    monkeypatch.setattr(pipe, call, faulty)
    engine = DiffusionEngine(pipe)
    engine.add_request("a", GOOD["a"])
    engine.add_request("bad", req("the poisoned one", 2))
    engine.add_request("c", GOOD["c"])
    final = engine.run()
    assert final["bad"].kind == "error" and f"injected {call} failure" in str(final["bad"].error)
    for rid, ref in reference.items():
        assert final[rid].kind == "finished", (rid, final[rid].error)
        assert_pixels_close(np.stack(final[rid].output.images), ref, 1)
    assert not engine.has_unfinished()
