"""BAGEL-7B-MoT dimensions through vLLM's own server on the GPU: one `vllm serve CKPT --omni`
process (the CUDA build: the AR engine with torch.compile and CUDA graphs at vLLM's defaults, the
DiT stage beside it) answers chat text and chat images, both checked against the plain-PyTorch
references on the same weights after the server stopped (tests/reference/: no vLLM, no KV cache).

* text: chat (greedy) == vLLM's /v1/completions on the chat template's prompt written out by hand,
  streamed == not streamed; the generated tokens' logprobs against the float32 understanding
  reference (tolerances of test_bagel_understanding_gpu.py);
* image: chat with modalities=["image"] == /v1/images/generations byte for byte (same seed), and
  that image against the full-sequence generation reference with the control of
  test_bagel_generation_gpu.py (the same request at another seed).
"""

from __future__ import annotations

import base64
import gc
import io

import numpy as np
import pytest
import torch

from .conftest import report
from .test_bagel_generation_gpu import SIDE, STEPS, assert_tracks
from .test_bagel_understanding_gpu import GREEDY_MARGIN, LOGPROB_MAX_TOL, LOGPROB_MEAN_TOL, TEXT2TEXT, _reference_logprobs

pytestmark = pytest.mark.gpu

N_TOKENS = 8
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the checkpoint's chat template default
USER = "Write a short poem about a red cat on a blue chair."
SERVE_ARGS = ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.35"]


def _pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def ask_one_server(ckpt, serve_args: list[str], log, model: str, side: int = SIDE, steps: int = STEPS) -> dict:
    """Start `vllm serve ckpt --omni *serve_args`, ask it chat text (plain, streamed), the same prompt through
    /v1/completions, and a chat image, the same image through /v1/images/generations and a control seed."""
    from vllm_omni_plugin.server.spawn import spawn_server

    with spawn_server(ckpt, serve_args, log=log) as server:
        client = server.client()
        messages = [{"role": "user", "content": USER}]
        got = {"startup_s": server.startup_seconds}
        got["chat"] = client.chat.completions.create(
            model=model, messages=messages, max_tokens=N_TOKENS, temperature=0.0, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True})
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=N_TOKENS,
                                                temperature=0.0, stream=True)
        got["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        got["completion"] = client.completions.create(model=model, prompt=SYSTEM + TEXT2TEXT, max_tokens=N_TOKENS,
                                                      temperature=0.0)
        size = f"{side}x{side}"
        ext = {"seed": 1, "num_inference_steps": steps}
        got["chat_image"] = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "a red cat"}], modalities=["image"],
            extra_body={**ext, "size": size})
        got["image"] = client.images.generate(model=model, prompt="a red cat", size=size, extra_body=ext)
        got["control"] = client.images.generate(model=model, prompt="a red cat", size=size,
                                                extra_body={**ext, "seed": 2})
        assert server.proc.poll() is None
    return got


def test_chat_text_and_images_from_one_vllm_server_match_the_references(full_bagel, tmp_path):
    from reference.bagel_generation import BagelReference
    from reference.bagel_understanding import BagelUnderstanding

    assert TEXT2TEXT == f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    prompt = SYSTEM + TEXT2TEXT
    got = ask_one_server(full_bagel, SERVE_ARGS, tmp_path / "server.log", str(full_bagel))
    report("bagel_server_gpu", server_startup_s=got["startup_s"])
    chat, streamed, done = got["chat"], got["streamed"], got["completion"]
    chat_image, generated, control = got["chat_image"], got["image"], got["control"]

    text = chat.choices[0].message.content
    assert chat.usage.completion_tokens == N_TOKENS
    assert streamed == text
    assert done.choices[0].text == text  # the chat template's prompt, as written above
    content = chat.choices[0].logprobs.content
    generated_ids = [int(t.token.removeprefix("token_id:")) for t in content]
    served_lp = np.asarray([t.logprob for t in content])

    (part,) = chat_image.choices[0].message.content
    assert part["type"] == "image_url"
    chat_pixels = _pixels(part["image_url"]["url"].split(",", 1)[1])
    ours = _pixels(generated.data[0].b64_json)
    assert chat_pixels.shape == (SIDE, SIDE, 3)
    assert np.array_equal(chat_pixels, ours)  # one pipeline behind both routes

    _free_gpu()
    understanding = BagelUnderstanding(full_bagel, device="cuda", dtype=torch.float32)
    prompt_ids = understanding.tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) == chat.usage.prompt_tokens
    ids = prompt_ids + generated_ids
    ref_lp, ref_argmax, margin = _reference_logprobs(understanding, ids, [])
    del understanding
    _free_gpu()
    rows = slice(len(prompt_ids) - 1, len(ids) - 1)  # row r predicts token r + 1
    diff = np.abs(served_lp - ref_lp[rows])
    decisive = margin[rows] > GREEDY_MARGIN
    disagreements = int((decisive & (ref_argmax[rows] != np.asarray(generated_ids))).sum())
    report("bagel_server_text_vs_reference", mean_abs_logprob_err=float(diff.mean()),
           max_abs_logprob_err=float(diff.max()), decisive_positions=int(decisive.sum()),
           greedy_disagreements=disagreements)

    reference = BagelReference(full_bagel, device="cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as the generation test's reference
    try:
        expected = reference.generate("a red cat", height=SIDE, width=SIDE, seed=1, steps=STEPS)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
        del reference
        _free_gpu()
    assert_tracks("bagel_server_text2img", ours, expected, _pixels(control.data[0].b64_json))
    assert diff.mean() <= LOGPROB_MEAN_TOL and diff.max() <= LOGPROB_MAX_TOL, (diff.mean(), diff.max())
    assert disagreements == 0
