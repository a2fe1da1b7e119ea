"""`vllm serve --omni --omni-cfg-parallel-size 2` on CPU: two gloo ranks behind the real server."""

from __future__ import annotations

import base64
import io

import numpy as np
import requests
from PIL import Image

from .conftest import API_KEY, start_server


def test_cfg_parallel_server_matches_offline(checkpoint, tmp_path):
    from vllm_omni_plugin import Omni

    model = checkpoint("qwen-image")
    body = {"prompt": "a red cat", "negative_prompt": "blurry", "true_cfg_scale": 4.0, "seed": 5,
            "size": "64x64", "cache_threshold": 0.0}
    server = start_server("qwen-image", model, tmp_path, ["--omni-cfg-parallel-size", "2"])
    try:
        r = requests.post(server.url + "/v1/images/generations", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["omni"]["resolved"]["cache_threshold"] == 0.0
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    finally:
        server.stop()
        log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    offline = Omni(model=str(model), dtype="float32", device="cpu").generate(
        {"prompt": "a red cat", "negative_prompt": "blurry", "true_cfg_scale": 4.0, "seed": 5, "height": 64,
         "width": 64, "num_inference_steps": 2, "output_type": "np"})[0].images[0]
    offline = (np.asarray(offline) * 255).round().astype(np.uint8)
    # CFG-parallel runs cond and uncond as two forwards, the one-device default as one: float rounding,
    # at most one uint8 level (see diffusion.md, "Batching and exactness")
    assert np.abs(served.astype(int) - offline.astype(int)).max() <= 1
