"""`vllm serve <tiny BAGEL> --omni` with no flags beyond where to listen, and no environment:
the shipped stage config on CPU (eager, KV cache sized from free memory) answers text and image."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time

import openai
import pytest
import requests
from PIL import Image

from .conftest import ROOT, VLLM, Server, free_port

pytestmark = pytest.mark.engine


def test_bagel_serves_text_and_images_with_default_flags(checkpoint, tmp_path):
    model = checkpoint("bagel")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(VLLM), "serve", str(model), "--omni", "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server("bagel", model, port, proc, log)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model=str(model), max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "Describe a cat."}])
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 4
        image = client.images.generate(prompt="a red cat", size="64x64",
                                       extra_body={"seed": 0, "num_inference_steps": 2})
        assert Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json))).size == (64, 64)
        assert "Explicitly set" in log.read_text()  # vLLM got our KV size; nothing was given by hand
    finally:
        server.stop()
