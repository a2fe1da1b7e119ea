"""Real vLLM engines on tiny checkpoints, one per model per test session.

An engine costs ~20-30 s to start on the CPU build, so every test of a model
shares one. Registered in conftest.py through `pytest_plugins`.

CPU-build constraints: float32 (bfloat16 kills the worker), eager mode.
"""

from __future__ import annotations

import os

import pytest

# Tests look inside the engine's model (e.g. its parameter names) with
# LLM.apply_model, which ships a function to the worker process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

BAGEL_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def bagel_llm(checkpoint):
    """Plain `vllm.LLM` on the tiny BAGEL checkpoint: vLLM's own BagelForConditionalGeneration."""
    from vllm import LLM

    llm = LLM(
        model=str(checkpoint("bagel")),
        dtype="float32",
        max_model_len=BAGEL_MAX_MODEL_LEN,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 1},
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()
