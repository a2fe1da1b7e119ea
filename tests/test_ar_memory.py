"""The AR stage's KV cache on CPU: sized from the checkpoint and free memory, or a clear error.

The engine half (tests/test_omni_lifecycle.py) starts the shipped BAGEL stage config
with no flags and no VLLM_CPU_KVCACHE_SPACE; vLLM's own log there shows the size
per token computed here is the one its KV cache uses.
"""

from __future__ import annotations

import pytest

from vllm_omni_plugin.orchestrator.ar_memory import (
    GiB,
    KV_SHARE_OF_FREE,
    ARStageDoesNotFit,
    kv_bytes_per_token,
    size_cpu_kv_cache,
)
from vllm_omni_plugin.orchestrator.stage_config import stage_config_for

MiB = 1 << 20


@pytest.fixture
def bagel(checkpoint, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return checkpoint("bagel")


def test_bytes_per_token_follow_the_language_model_and_dtype(bagel):
    import json

    llm = json.loads((bagel / "config.json").read_text())["llm_config"]
    head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
    per_element = 2 * llm["num_hidden_layers"] * llm["num_key_value_heads"] * head_dim
    assert kv_bytes_per_token(bagel) == per_element * 2  # the checkpoint's bfloat16
    assert kv_bytes_per_token(bagel, "float32") == per_element * 4
    assert kv_bytes_per_token(bagel, "torch.bfloat16") == per_element * 2


def test_the_shipped_stage_config_gets_a_cache_for_its_batch_when_memory_allows(bagel):
    ar = stage_config_for(["BagelForConditionalGeneration"]).stage("ar")
    args = ar.engine_args_for("cpu")
    assert args["enforce_eager"] is True  # the CPU overlay
    sized = size_cpu_kv_cache(bagel, args, ar.max_batch_size, free_bytes=20 * GiB)
    per_token = kv_bytes_per_token(bagel)
    assert sized["kv_cache_memory_bytes"] == per_token * args["max_model_len"] * ar.max_batch_size
    assert {k: v for k, v in sized.items() if k != "kv_cache_memory_bytes"} == args  # nothing else changed


def test_little_free_memory_caps_the_cache_and_too_little_names_the_fix(bagel):
    per_token = kv_bytes_per_token(bagel, "float32")
    max_len = 16384
    one = per_token * max_len
    free = int(3 * one / KV_SHARE_OF_FREE)  # room for three sequences, not sixteen
    sized = size_cpu_kv_cache(bagel, {"dtype": "float32", "max_model_len": max_len}, 16, free_bytes=free)
    assert sized["kv_cache_memory_bytes"] == int(free * KV_SHARE_OF_FREE)

    free = int(one / 3 / KV_SHARE_OF_FREE)  # a third of one sequence
    with pytest.raises(ARStageDoesNotFit) as info:
        size_cpu_kv_cache(bagel, {"dtype": "float32", "max_model_len": max_len}, 16, free_bytes=free)
    message = str(info.value)
    assert "\n" not in message and f"one {max_len}-token sequence" in message
    fits = int(message.split("Lower max_model_len to ")[1].split(" ")[0])
    assert 0 < fits < max_len and fits * per_token <= free * KV_SHARE_OF_FREE  # the suggested value does fit
    assert f"--max-model-len {fits}" in message and "stages[ar].engine_args.max_model_len" in message
    assert "--kv-cache-memory-bytes" in message and "VLLM_CPU_KVCACHE_SPACE" in message


def test_a_cache_the_user_sized_is_left_alone(bagel, monkeypatch):
    tiny_free = 1 * MiB  # would not fit anything: proves no sizing (and no error) happens
    given = {"max_model_len": 16384, "kv_cache_memory_bytes": 64 * MiB}
    assert size_cpu_kv_cache(bagel, given, 16, free_bytes=tiny_free) == given
    assert size_cpu_kv_cache(bagel, {"gpu_memory_utilization": 0.3}, 16, free_bytes=tiny_free) == {"gpu_memory_utilization": 0.3}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert size_cpu_kv_cache(bagel, {"max_model_len": 16384}, 16, free_bytes=tiny_free) == {"max_model_len": 16384}
