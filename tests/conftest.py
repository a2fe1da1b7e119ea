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


@pytest.fixture
def bench_bagel_dit(tmp_path, monkeypatch) -> Callable[[list[str]], dict]:
    """`bench_bagel_dit(argv)` -> the JSON of benchmarks/bench_bagel_dit.py's `main(argv)`, run in this
    process (it exits 0; torch's CPU thread count, which the script sets, is restored)."""
    import importlib.util
    import json

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bagel_dit.py"
    spec = importlib.util.spec_from_file_location("bench_bagel_dit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))

    def run(argv: list[str]) -> dict:
        threads = torch.get_num_threads()
        try:
            assert bench.main(argv) == 0
        finally:
            torch.set_num_threads(threads)
        return json.loads((tmp_path / "bench_bagel_dit.json").read_text())

    return run
