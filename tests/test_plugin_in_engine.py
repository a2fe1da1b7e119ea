"""The plugin inside a running vLLM engine: loaded in the worker process, patch visible there,
omni architecture instantiated through vLLM's registry."""

from __future__ import annotations

import os

import pytest

from vllm_omni_plugin.model_registry import OMNI_MODELS

OMNI_BAGEL = "OmniBagelForConditionalGeneration"
PROMPT = "<|im_start|>user\nDescribe a red cat.<|im_end|>\n<|im_start|>assistant\n"


# Shipped to the worker by collective_rpc / apply_model: must be module-level.
def worker_report(worker) -> dict:
    from vllm_omni_plugin.doctor import collect

    report = collect()
    return {
        "pid": report.pid,
        "patches": report.patches,
        "architectures": report.architectures,
        "is_mm_prefix_lm": worker.vllm_config.model_config.is_mm_prefix_lm,
    }


def model_class_name(model) -> str:
    return type(model).__name__


def greedy_tokens(llm) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))
    return list(out[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def omni_bagel_llm(checkpoint):
    """The same tiny checkpoint, but its config names the plugin's architecture."""
    from vllm import LLM

    llm = LLM(
        model=str(checkpoint("bagel")), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 1}, hf_overrides={"architectures": [OMNI_BAGEL]},
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_plugin_is_loaded_and_patched_inside_the_worker(bagel_llm):
    (report,) = bagel_llm.collective_rpc(worker_report)
    assert report["pid"] != os.getpid(), "the report must come from the engine's worker process"
    assert [p["status"] for p in report["patches"]] == ["applied"] * len(report["patches"])
    assert {a["architecture"] for a in report["architectures"] if a["registered"]} == {
        m.architecture for m in OMNI_MODELS
    }
    assert report["is_mm_prefix_lm"] is True


def test_omni_architecture_runs_through_vllms_registry(omni_bagel_llm, bagel_llm):
    assert omni_bagel_llm.apply_model(model_class_name) == [OMNI_BAGEL]
    (report,) = omni_bagel_llm.collective_rpc(worker_report)
    assert report["is_mm_prefix_lm"] is True
    # Today the omni class is vLLM's Bagel under our name: same weights, same answer.
    assert greedy_tokens(omni_bagel_llm) == greedy_tokens(bagel_llm)
