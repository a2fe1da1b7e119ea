"""The GPU tier: `pytest -m gpu` on a machine with the CUDA build of vLLM.

Everything here runs at the real model dimensions with seeded random weights
(`vllm-omni make-checkpoint ... --preset full --device cuda`), in bfloat16,
with vLLM's defaults for the AR engine (its attention backend, torch.compile
and CUDA graphs on). Without a CUDA GPU and vLLM's CUDA platform every test
here is skipped, saying why; the CPU suite (`make test`) never builds them.

Checkpoints are written once under $OMNI_GPU_CKPT_DIR (default
/dev/shm/omni-gpu-ckpt: host memory, so loading is not disk-bound) and reused
by later runs on the same machine (benchmarks/ reads the same folder).
Measured numbers (tolerances actually seen) are appended as JSON lines to
$OMNI_GPU_REPORT when it is set, for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a test function
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _why_not_gpu() -> str | None:
    try:
        import torch
    except ImportError as e:
        return f"no torch ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device (the GPU tier needs an NVIDIA GPU and the CUDA build of vLLM)"
    try:
        from vllm.platforms import current_platform
    except ImportError as e:
        return f"no vLLM ({e})"
    if not current_platform.is_cuda():
        return f"vLLM's platform is {current_platform.device_type}, not cuda (the CPU build is installed)"
    return None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if not ours:
        return
    reason = _why_not_gpu()
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"GPU tier: {reason}"))
    # The session's in-process BAGEL (`bagel_gpu_omni`: ~70 GB of GPU memory until the session
    # ends) goes last: the tests that start servers or other engines need that memory first.
    late = [item for item in ours if "bagel_gpu_omni" in getattr(item, "fixturenames", ())]
    if late:
        late_ids = {id(item) for item in late}
        items[:] = [item for item in items if id(item) not in late_ids] + late


def ckpt_root() -> Path:
    return Path(os.environ.get("OMNI_GPU_CKPT_DIR", "/dev/shm/omni-gpu-ckpt"))


def full_checkpoint(family: str, seed: int = 0) -> Path:
    """A full-size checkpoint drawn on the GPU, built once per machine."""
    from vllm_omni_plugin.checkpoints import cached_checkpoint

    return cached_checkpoint(family, "full", ckpt_root(), seed=seed, device="cuda")


def report(name: str, **figures) -> None:
    """Record measured figures (printed, and appended to $OMNI_GPU_REPORT as one JSON line)."""
    line = json.dumps({"test": name, **figures}, default=float)
    print(f"\n[gpu-report] {line}")
    path = os.environ.get("OMNI_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="session", autouse=True)
def _exact_fp32_references():
    """The plain-PyTorch references compute in float32: no TF32 anywhere (vLLM's bf16 is unaffected)."""
    if _why_not_gpu() is None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield


# The AR engine as a GPU deployment runs it: bf16, vLLM's own backend choice, compile and CUDA
# graphs at vLLM's defaults (no enforce_eager). Memory: the DiT stage (~29 GB) lives in this
# process beside it, and the float32 references of the tests need ~30 GB more.
BAGEL_GPU_AR_ARGS = {"dtype": "bfloat16", "gpu_memory_utilization": 0.30, "seed": 0}


@pytest.fixture(scope="session")
def full_bagel() -> Path:
    return full_checkpoint("bagel")


@pytest.fixture(scope="session")
def full_glm_image() -> Path:
    return full_checkpoint("glm-image")


@pytest.fixture(scope="session")
def bagel_gpu_omni(full_bagel):
    import torch

    from vllm_omni_plugin.omni import Omni

    omni = Omni(str(full_bagel), dtype=torch.bfloat16, device="cuda", ar_engine_args=BAGEL_GPU_AR_ARGS)
    yield omni
    omni.shutdown()


def picture(seed: int, size: int, height: int | None = None):
    """A seeded random RGB image (size x height)."""
    import numpy as np
    from PIL import Image

    h = height or size
    return Image.fromarray((np.random.default_rng(seed).random((h, size, 3)) * 255).astype(np.uint8))
