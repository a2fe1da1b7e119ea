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


# Small steps, so that a long prompt's prefill spans several chunks.
BAGEL_KV_BATCHED_TOKENS = 64


def _omni_bagel_kv_llm(model: str, transfer_dir, batched_tokens: int, limit_mm_per_prompt: dict):
    """`vllm.LLM` on the tiny BAGEL as OmniBagelForConditionalGeneration with OmniKVConnector."""
    from vllm import LLM

    return LLM(
        model=model,
        hf_overrides={"architectures": ["OmniBagelForConditionalGeneration"]},
        dtype="float32",
        max_model_len=BAGEL_MAX_MODEL_LEN,
        max_num_batched_tokens=batched_tokens,
        enable_chunked_prefill=True,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt=limit_mm_per_prompt,
        kv_transfer_config={
            "kv_connector": "OmniKVConnector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"transfer_dir": str(transfer_dir)},
        },
    )


@pytest.fixture(scope="session")
def bagel_kv_llm(checkpoint, tmp_path_factory):
    """Yields (llm, transfer_dir). Chunked prefill with BAGEL_KV_BATCHED_TOKENS
    tokens per step, so the connector is exercised across prefill chunks.
    """
    transfer_dir = tmp_path_factory.mktemp("kv-transfer")
    llm = _omni_bagel_kv_llm(str(checkpoint("bagel")), transfer_dir, BAGEL_KV_BATCHED_TOKENS, {"image": 1})
    yield llm, transfer_dir
    llm.llm_engine.engine_core.shutdown()


# The CPU engine's settings for a multi-stage BAGEL (the stage config's defaults are GPU-sized).
# img2img: `vae_image` inputs; a whole prompt (the largest VAE block is 66 tokens) in one step.
BAGEL_AR_TEST_ARGS = {"dtype": "float32", "max_model_len": BAGEL_MAX_MODEL_LEN, "enforce_eager": True, "seed": 0,
                      "limit_mm_per_prompt": {"image": 1, "vae_image": 1}, "max_num_batched_tokens": BAGEL_MAX_MODEL_LEN}


@pytest.fixture(scope="session")
def bagel_omni(checkpoint):
    """`Omni` on the tiny BAGEL: AR stage on vLLM (OmniBagel + OmniKVConnector), DiT stage inline."""
    from vllm_omni_plugin import Omni

    omni = Omni(str(checkpoint("bagel")), dtype="float32", device="cpu", ar_engine_args=BAGEL_AR_TEST_ARGS)
    yield omni
    omni.shutdown()


@pytest.fixture(scope="session")
def bagel_img2img_llm(checkpoint, tmp_path_factory):
    """Like `bagel_kv_llm`, taking img2img (`vae_image`) inputs. Yields (llm, transfer_dir).

    `vae_image` is opt-in through limit_mm_per_prompt; the tiny checkpoint's largest
    VAE block (128 px: 64 latent tokens + 2 markers) must fit one step, since CPU
    prefill does not split multimodal items.
    """
    transfer_dir = tmp_path_factory.mktemp("kv-transfer-img2img")
    llm = _omni_bagel_kv_llm(str(checkpoint("bagel")), transfer_dir, 96, {"image": 1, "vae_image": 1})
    yield llm, transfer_dir
    llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------ GLM-Image

GLM_AR_MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def glm_image_checkpoint(checkpoint, tmp_path_factory):
    """The tiny GLM-Image checkpoint with a deterministic AR stage.

    Its generation_config.json gets top_k=1: diffusers' pipeline samples
    (`do_sample=True`) and our AR stage honours the same file, so both then
    take the arg-max token, and the whole pipelines can be compared pixel for pixel.
    """
    import json
    import shutil

    out = tmp_path_factory.mktemp("glm-image-deterministic") / "ckpt"
    shutil.copytree(checkpoint("glm-image"), out)
    path = out / "vision_language_encoder" / "generation_config.json"
    config = json.loads(path.read_text())
    config["top_k"] = 1
    path.write_text(json.dumps(config, indent=2))
    return out


def glm_ar_args(checkpoint) -> dict:
    """`vllm.LLM` arguments for GLM-Image's AR model on the CPU build."""
    return dict(
        model=str(checkpoint / "vision_language_encoder"),
        tokenizer=str(checkpoint / "processor"),
        dtype="float32",
        max_model_len=GLM_AR_MAX_MODEL_LEN,
        enforce_eager=True,
        seed=0,
    )


@pytest.fixture(scope="session")
def glm_ar_llm(glm_image_checkpoint):
    """Plain `vllm.LLM` on the tiny GLM-Image AR model (the plugin's architecture)."""
    from vllm import LLM

    llm = LLM(**glm_ar_args(glm_image_checkpoint))
    yield llm
    llm.llm_engine.engine_core.shutdown()


# The AR stage's CPU settings (the shipped stage config's are GPU-sized).
GLM_AR_TEST_ARGS = {"dtype": "float32", "max_model_len": GLM_AR_MAX_MODEL_LEN, "enforce_eager": True, "seed": 0}


@pytest.fixture(scope="session")
def glm_omni(glm_image_checkpoint):
    """`Omni` on the tiny deterministic GLM-Image: AR stage on vLLM, DiT stage inline."""
    from vllm_omni_plugin import Omni

    # No dtype and no device: the defaults a user gets (one dtype for both stages, orchestrator/stage_dtype.py);
    # the oracle tests on this fixture compare them with diffusers' float32 pipeline.
    ar_args = {k: v for k, v in GLM_AR_TEST_ARGS.items() if k != "dtype"}
    omni = Omni(str(glm_image_checkpoint), ar_engine_args=ar_args)
    assert omni._stages.stage_dtypes == {"ar": "float32", "dit": "float32"}
    yield omni
    omni.shutdown()
