"""Qwen-Image at its real dimensions on the GPU: `vllm serve --omni` + the openai client gives the
same bytes as the offline `Omni` (same request, seed and dtype; one request at a time, so both run
the same kernels on the same shapes)."""

from __future__ import annotations

import base64
import gc
import hashlib
import io

import numpy as np
import pytest
import torch

from .conftest import full_checkpoint, report

pytestmark = pytest.mark.gpu

REQUEST = {"prompt": "a red cat on a blue chair", "height": 512, "width": 512, "seed": 7, "num_inference_steps": 8}


def pixels_md5(image) -> str:
    return hashlib.md5(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def test_served_image_equals_offline_byte_for_byte(tmp_path):
    from PIL import Image

    from vllm_omni_plugin.diffusion.params import SamplingParams
    from vllm_omni_plugin.omni import Omni
    from vllm_omni_plugin.server.spawn import spawn_server

    ckpt = full_checkpoint("qwen-image")
    omni = Omni(str(ckpt), dtype=torch.bfloat16, device="cuda")
    (offline,) = omni.generate([REQUEST["prompt"]], SamplingParams(**{k: v for k, v in REQUEST.items() if k != "prompt"}))
    expected = pixels_md5(offline.images[0])
    del omni, offline
    gc.collect()
    torch.cuda.empty_cache()

    with spawn_server(ckpt, ["--dtype", "bfloat16"], log=tmp_path / "server.log") as server:
        r = server.client().images.generate(
            model=str(ckpt), prompt=REQUEST["prompt"], size=f"{REQUEST['width']}x{REQUEST['height']}",
            extra_body={"seed": REQUEST["seed"], "num_inference_steps": REQUEST["num_inference_steps"]},
        )
        served = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        report("qwen_image_served_vs_offline", offline_md5=expected, served_md5=pixels_md5(served),
               server_startup_s=server.startup_seconds)
    assert served.size == (REQUEST["width"], REQUEST["height"])
    assert pixels_md5(served) == expected
