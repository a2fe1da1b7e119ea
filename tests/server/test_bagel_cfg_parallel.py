"""`vllm serve <tiny BAGEL> --omni --omni-cfg-parallel-size 2`: the DiT stage on two gloo ranks behind
vLLM's own server, real `openai` client, against the offline one-process `Omni` (`bagel_omni`).

The ranks run other row groupings than one process (cond alone, the companions together), so the
velocities round differently (tests/test_bagel_cfg_parallel.py bounds the latents and pixels at 1e-4);
BAGEL's uint8 conversion truncates, so a pixel may land one level apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_omni_plugin.diffusion.params import SamplingParams

from .conftest import b64_png, png_bytes, striped_image

pytestmark = pytest.mark.engine

MODEL = "tiny-bagel"


def _close(served, offline) -> None:
    a, b = np.asarray(served).astype(int), np.asarray(offline).astype(int)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_cfg_parallel_server_equals_offline_one_process(omni_server, bagel_omni):
    server = omni_server("bagel", variant="cfg-parallel-2", extra=["--omni-cfg-parallel-size", "2"])
    client = server.client()
    t2i = {"seed": 7, "num_inference_steps": 4, "negative_prompt": "blurry"}
    http = client.images.generate(model=MODEL, prompt="a red cat", size="48x32", extra_body=t2i)
    image = striped_image(48, 32)
    i2i = {"seed": 4, "num_inference_steps": 4}
    edit = client.images.edit(model=MODEL, image=("in.png", png_bytes(image), "image/png"), prompt="make it blue",
                              extra_body=i2i)
    (off_t2i,) = bagel_omni.generate(["a red cat"], SamplingParams(width=48, height=32, **t2i))
    (off_i2i,) = bagel_omni.generate(["make it blue"], SamplingParams(images=[image], **i2i))
    _close(b64_png(http.data[0].b64_json), off_t2i.images[0])
    _close(b64_png(edit.data[0].b64_json), off_i2i.images[0])
    assert http.model_extra["omni"]["resolved"]["seed"] == 7

    # a request with fewer CFG branches than ranks: an OpenAI-format 400 naming the fix; the server goes on
    import openai

    with pytest.raises(openai.BadRequestError, match="CFG-parallel over 2 ranks.*has 1 \\(cond\\)"):
        client.images.generate(model=MODEL, prompt="a red cat", size="32x32",
                               extra_body={"num_inference_steps": 3, "cfg_text_scale": 1.0})
    again = client.images.generate(model=MODEL, prompt="a red cat", size="48x32", extra_body=t2i)
    assert again.data[0].b64_json == http.data[0].b64_json
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
