"""GLM-Image's AR model inside vLLM (plain `vllm.LLM`), against transformers on the same tiny weights.

Oracles: transformers' `GlmImageForConditionalGeneration` -- its M-RoPE
positions (`get_rope_index` and the decode positions it caches), its greedy
tokens, and `GlmImageProcessor`'s prompt for a requested size.
"""

from __future__ import annotations

import pytest
import torch

from vllm_omni_plugin.families.glm_image.positions import DecodeGridTable, prompt_positions
from vllm_omni_plugin.families.glm_image.prompt import UnsupportedSize, target_grids

PROMPT = 'A red "OMNI" sign on a blue wall'
# (height, width): square, another square, non-square (768x1344 scaled by 1/3).
SIZES = [(256, 256), (384, 384), (256, 448)]


def _processor(ckpt):
    from transformers import GlmImageProcessor

    return GlmImageProcessor.from_pretrained(ckpt / "processor")


def _reference_inputs(ckpt, height: int, width: int):
    """The AR prompt as diffusers' GlmImagePipeline.generate_prior_tokens builds it."""
    messages = [[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]]
    return _processor(ckpt).apply_chat_template(
        messages, tokenize=True, target_h=height, target_w=width, return_dict=True, return_tensors="pt"
    )


def _our_prompt_ids(ckpt, height: int, width: int) -> list[int]:
    tok = _processor(ckpt).tokenizer
    text = PROMPT + target_grids(height, width, text_to_image=True).suffix(tok.bos_token)
    return tok(text, add_special_tokens=False)["input_ids"]


def _transformers_model(ckpt):
    from transformers import GlmImageForConditionalGeneration

    return GlmImageForConditionalGeneration.from_pretrained(ckpt / "vision_language_encoder", dtype=torch.float32).eval()


@pytest.mark.parametrize("height,width", SIZES)
def test_prompt_for_a_size_equals_the_processors(glm_image_checkpoint, height, width):
    ref = _reference_inputs(glm_image_checkpoint, height, width)
    assert _our_prompt_ids(glm_image_checkpoint, height, width) == ref["input_ids"][0].tolist()


@pytest.mark.parametrize("height,width", [(250, 256), (256, 128), (4096, 256), (256, 2080)])
def test_a_size_glm_image_cannot_render_names_the_allowed_ones(height, width):
    with pytest.raises(UnsupportedSize, match="multiples of 32 between 256 and 2048"):
        target_grids(height, width, text_to_image=True)


@pytest.mark.parametrize("height,width", SIZES)
def test_positions_equal_transformers_get_rope_index(glm_image_checkpoint, height, width):
    ref = _reference_inputs(glm_image_checkpoint, height, width)
    model = _transformers_model(glm_image_checkpoint).model
    ref_prompt, _ = model.get_rope_index(
        ref["input_ids"], image_grid_thw=ref["image_grid_thw"], images_per_sample=ref["images_per_sample"]
    )
    ref_decode = model._cached_decode_position_ids[0]  # [3, generated tokens]

    n = ref["input_ids"].shape[1]
    positions, start = prompt_positions(n, [])
    assert torch.equal(positions, ref_prompt[:, 0])
    grids = target_grids(height, width, text_to_image=True).decode_grids
    table = DecodeGridTable()
    table.register(n, 7, [(3, 5)])  # another request in another slot
    delta = table.register(n, start, grids)
    steps = ref_decode.shape[1] + 3  # past the end marker: it repeats
    codes = torch.arange(n + delta, n + delta + steps).repeat(3, 1)
    assert int(codes.max()) < 2**31  # vLLM's position buffer is int32 on the CPU runner
    # Prompt columns (mixed into the same batch) pass through unchanged.
    mixed = torch.cat([positions, codes[:, :5]], dim=1)
    # The conversion writes into the caller's buffer (piecewise CUDA graphs read their inputs
    # at the captured addresses): here a [3, N] view of a wider buffer, as vLLM's GPU runner
    # hands it (its buffer has one extra column, so the view is not contiguous).
    buffer = torch.zeros(3, steps + 1, dtype=torch.long)
    view = buffer[:, :steps]
    view.copy_(codes)
    ours = table.positions(view)
    assert ours.data_ptr() == buffer.data_ptr() and ours.stride() == view.stride()
    assert torch.equal(buffer[:, : ref_decode.shape[1]], ref_decode)
    assert torch.equal(buffer[:, steps - 3 : steps], ref_decode[:, -1:].expand(3, 3))
    assert torch.equal(table.positions(mixed)[:, :n], positions)


def _greedy_transformers(ckpt, height: int, width: int, max_new_tokens: int) -> list[int]:
    ref = _reference_inputs(ckpt, height, width)
    model = _transformers_model(ckpt)
    with torch.no_grad():
        out = model.generate(**ref, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ref["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("height,width", [(256, 256), (256, 448)])
def test_greedy_tokens_equal_transformers(glm_image_checkpoint, glm_ar_llm, height, width):
    from vllm import SamplingParams

    grids = target_grids(height, width, text_to_image=True)
    n = sum(h * w for h, w in grids.decode_grids) + 1
    expected = _greedy_transformers(glm_image_checkpoint, height, width, n)
    prompt = {"prompt_token_ids": _our_prompt_ids(glm_image_checkpoint, height, width)}
    out = glm_ar_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)[0]
    got = list(out.outputs[0].token_ids)
    assert len(got) == n
    # Only image tokens can come out of GLM-Image's vision-vocabulary head.
    assert max(got) < glm_ar_llm.llm_engine.model_config.hf_config.text_config.vision_vocab_size
    assert got == expected


def test_two_sizes_decoding_in_one_batch_equal_transformers(glm_image_checkpoint, glm_ar_llm):
    """Two target sizes generated in one batch: each request decodes from its own slot of the
    grid table (the H200 run of 2026-12-02 disagreed with transformers only when batched)."""
    from vllm import SamplingParams

    sizes = [(256, 256), (256, 448)]
    prompts, params, expected = [], [], []
    for height, width in sizes:
        grids = target_grids(height, width, text_to_image=True)
        n = sum(h * w for h, w in grids.decode_grids) + 1
        expected.append(_greedy_transformers(glm_image_checkpoint, height, width, n))
        prompts.append({"prompt_token_ids": _our_prompt_ids(glm_image_checkpoint, height, width)})
        params.append(SamplingParams(temperature=0.0, max_tokens=n))
    outs = glm_ar_llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_sampling_defaults_come_from_generation_config(glm_image_checkpoint, glm_ar_llm):
    """vLLM reads vision_language_encoder/generation_config.json, as transformers' generate does."""
    import json

    from vllm import SamplingParams

    config = json.loads((glm_image_checkpoint / "vision_language_encoder" / "generation_config.json").read_text())
    defaults = glm_ar_llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (
        config["temperature"], config["top_p"], config["top_k"]
    )  # fmt: skip
    # top_k=1 in this checkpoint: sampling with its defaults is greedy decoding.
    prompt = {"prompt_token_ids": _our_prompt_ids(glm_image_checkpoint, 256, 256)}
    defaults.max_tokens = 40
    sampled = glm_ar_llm.generate(prompt, defaults, use_tqdm=False)[0].outputs[0].token_ids
    greedy = glm_ar_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    assert list(sampled) == list(greedy[0].outputs[0].token_ids)


def source_image():
    """A 320x256 RGB noise image: sides multiples of 32 that GLM-Image's image processor keeps."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((256, 320, 3)) * 255).astype("uint8"))


def reference_i2i_inputs(ckpt, image, height: int, width: int):
    """The image-to-image AR prompt as diffusers' generate_prior_tokens builds it."""
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]]
    return _processor(ckpt).apply_chat_template(
        messages, tokenize=True, target_h=height, target_w=width, return_dict=True, return_tensors="pt"
    )


def our_i2i_prompt(ckpt, image, height: int, width: int) -> dict:
    processor = _processor(ckpt)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    text += target_grids(height, width, text_to_image=False).suffix(processor.tokenizer.bos_token)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": [image]}}


def test_image_to_image_greedy_tokens_equal_transformers(glm_image_checkpoint, glm_ar_llm):
    """Source image -> vision encoder -> VQ codes in the prompt, on their 2-D positions; the target grid after."""
    from vllm import SamplingParams

    height, width = 256, 320
    n = (height // 32) * (width // 32) + 1
    ref = reference_i2i_inputs(glm_image_checkpoint, source_image(), height, width)
    model = _transformers_model(glm_image_checkpoint)
    with torch.no_grad():
        expected = model.generate(**ref, max_new_tokens=n, do_sample=False)[0, ref["input_ids"].shape[1] :].tolist()
    prompt = our_i2i_prompt(glm_image_checkpoint, source_image(), height, width)
    out = glm_ar_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == ref["input_ids"].shape[1]  # the image expanded to its patches
    assert list(out.outputs[0].token_ids) == expected
    # Again: the image now comes from vLLM's multimodal processor cache.
    again = glm_ar_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)[0]
    assert list(again.outputs[0].token_ids) == expected
