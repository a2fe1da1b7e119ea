"""The AR stage's KV cache on the CPU build: sized from what the stage needs and what is free.

vLLM's CPU worker reserves `--gpu-memory-utilization` (default 0.92) of the
machine's *total* memory and refuses to start when less than that is free,
which is the normal state of a shared machine (and of any machine that already
holds the DiT stage). The one setting that sizes the KV cache without that
check is `kv_cache_memory_bytes` (what `VLLM_CPU_KVCACHE_SPACE` sets).

So, on CPU, unless the user sized the cache (`kv_cache_memory_bytes`,
`gpu_memory_utilization`, or `VLLM_CPU_KVCACHE_SPACE`), the AR stage gets

    min(what max_num_seqs sequences of max_model_len tokens need,
        KV_SHARE_OF_FREE of the memory free now)

and never less than one max_model_len sequence (vLLM refuses that). When even
one sequence does not fit, start-up stops here with a message that names the
flag and the stage-config field to change and the value that would fit.
GPU builds are left to vLLM's own profiling.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger("vllm.omni_plugin")

GiB = 1 << 30
# The rest of the free memory is for the AR stage's own weights and activations
# (loaded after this is computed, in the engine process) and the DiT's activations.
KV_SHARE_OF_FREE = 0.5
# Settings by which the user has sized the cache themselves.
USER_SIZED = ("kv_cache_memory_bytes", "gpu_memory_utilization")
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class ARStageDoesNotFit(ValueError):
    """The AR stage's KV cache for one max_model_len sequence exceeds what is free; the message says what to change."""


def kv_bytes_per_token(model: str | Path, dtype: Any = None) -> int:
    """K+V bytes one token takes over all layers of the checkpoint's language model.

    Args:
        model: checkpoint directory (config.json; where its language model's section sits is
            `_language_config`'s answer).
        dtype: the engine's `dtype` argument; "auto"/None reads the checkpoint's.

    Returns:
        2 * layers * kv_heads * head_dim * bytes per element.
    """
    config, llm = _language_config(model)
    heads = llm["num_attention_heads"]
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    kv_heads = llm.get("num_key_value_heads") or heads
    name = str(dtype).removeprefix("torch.") if dtype not in (None, "auto") else (
        llm.get("torch_dtype") or config.get("torch_dtype") or llm.get("dtype") or "float32")
    return 2 * llm["num_hidden_layers"] * kv_heads * head_dim * _DTYPE_BYTES.get(str(name), 4)


def free_memory_bytes() -> int:
    """Memory available to new allocations now (what vLLM's CPU worker also checks)."""
    import psutil

    return psutil.virtual_memory().available


def size_cpu_kv_cache(model: str | Path, engine_args: Mapping[str, Any], max_batch_size: int,
                      free_bytes: int | None = None) -> dict[str, Any]:
    """The AR stage's engine args with `kv_cache_memory_bytes` sized for this machine (CPU build).

    Args:
        model: the checkpoint directory.
        engine_args: the AR stage's resolved engine args (stage config + explicit flags).
        max_batch_size: the stage's batch limit; sequences the cache is sized for
            unless `max_num_seqs` is given.
        free_bytes: memory free now (default: measured).

    Returns:
        A new dict: `engine_args` unchanged when the user sized the cache, else with
        `kv_cache_memory_bytes` added.

    Raises:
        ARStageDoesNotFit: one `max_model_len` sequence needs more than the share of free memory.
    """
    args = dict(engine_args)
    if any(args.get(k) is not None for k in USER_SIZED) or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return args
    per_token = kv_bytes_per_token(model, args.get("dtype"))
    max_len = args.get("max_model_len") or _checkpoint_max_len(model)
    seqs = args.get("max_num_seqs") or max_batch_size
    free = free_memory_bytes() if free_bytes is None else free_bytes
    budget = int(free * KV_SHARE_OF_FREE)
    one_sequence = per_token * max_len
    if one_sequence > budget:
        fits = min((budget // per_token) // 256 * 256, _checkpoint_max_len(model))  # never past the model's own limit
        raise ARStageDoesNotFit(
            f"the AR stage's KV cache for one {max_len}-token sequence needs {one_sequence / GiB:.2f} GiB, but only "
            f"{budget / GiB:.2f} GiB can be given to it ({KV_SHARE_OF_FREE:.0%} of the {free / GiB:.2f} GiB free). "
            + (f"Lower max_model_len to {fits} (`--max-model-len {fits}`, or the stage config's "
               f"stages[ar].engine_args.max_model_len), " if fits > 0 else "")
            + "free memory, or size the cache yourself (`--kv-cache-memory-bytes N`, the stage config's "
            "stages[ar].engine_args.kv_cache_memory_bytes, or VLLM_CPU_KVCACHE_SPACE=<GiB>)"
        )
    args["kv_cache_memory_bytes"] = max(one_sequence, min(per_token * max_len * seqs, budget))
    logger.info(
        "omni: AR stage KV cache on CPU: %.2f GiB (%d tokens; %.2f GiB free); set kv_cache_memory_bytes "
        "(or --kv-cache-memory-bytes) to choose it", args["kv_cache_memory_bytes"] / GiB,
        args["kv_cache_memory_bytes"] // per_token, free / GiB)
    return args


def platform_name() -> str:
    """vLLM's device type of this process ("cpu", "cuda", ...): the key of a stage's `platform_engine_args`."""
    from vllm.platforms import current_platform

    return current_platform.device_type


def fit_ar_engine_args(model: str | Path, engine_args: Mapping[str, Any], max_batch_size: int) -> dict[str, Any]:
    """The AR stage's engine args for the platform this process runs on (CPU: `size_cpu_kv_cache`)."""
    if platform_name() == "cpu":
        return size_cpu_kv_cache(model, engine_args, max_batch_size)
    return dict(engine_args)


def _language_config(model: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, its language model's section): the section the checkpoint's family declares
    (`Family.llm_config_key`), else transformers' `text_config`, else the top level."""
    from ..registry import identify

    config = json.loads((Path(model) / "config.json").read_text())
    family = identify(model).family
    key = family.llm_config_key if family is not None else None
    return config, (config.get(key) if key else None) or config.get("text_config") or config


def _checkpoint_max_len(model: str | Path) -> int:
    _, llm = _language_config(model)
    return int(llm.get("max_position_embeddings") or 4096)
