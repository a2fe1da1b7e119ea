"""Shared test fixtures.

Checkpoints are generated once per test session (seeded, tiny) and engines are
started once per session: vLLM start-up costs ~20 s on the CPU build.
"""

from __future__ import annotations

import os

# The vLLM CPU build: a small KV cache, and no accidental hub access.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from vllm_omni_plugin.checkpoints import make_checkpoint  # noqa: E402

pytest_plugins = ["engine_fixtures"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """`checkpoint("qwen-image")` -> path of a tiny seeded checkpoint, built once per session."""
    built: dict[tuple[str, str, int], Path] = {}

    def get(family: str, preset: str = "tiny", seed: int = 0) -> Path:
        key = (family, preset, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"ckpt-{family}-{preset}-{seed}")
            built[key] = make_checkpoint(family, preset, out, seed=seed)
        return built[key]

    return get
