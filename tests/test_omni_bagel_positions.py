"""OmniBagel img2text uses ByteDance's BAGEL layout; vLLM's own Bagel keeps vLLM's.

BAGEL's layout (tests/reference/bagel_understanding.py, layout "bagel"): an
image block [<|vision_start|>, ViT tokens, <|vision_end|>] shares ONE RoPE
position and attends bidirectionally as a whole, markers included; the token
after it takes the block's position + 1.

Oracle: that float64 reference on the same tiny checkpoint. The engine runs
float32; prompt logprobs (every row), greedy tokens and their logprobs must
agree within TOL, and the prompt K/V the OmniKVConnector hands over within
KV_TOL. Both engines are the shared session fixtures: `bagel_kv_llm`
(OmniBagel, 64-token chunked prefill, so a long prompt's image block is
prefilled in a later step than its text) and `bagel_llm` (vLLM's Bagel).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from reference.bagel_understanding import BagelUnderstanding  # tests/ is on sys.path (rootdir conftest)
from test_bagel_mm_prefix import picture, reference_result, sampling, vllm_result

from vllm_omni_plugin.families.bagel.vllm_config import ARCHITECTURE, enable_bagel_mrope, register_config_hook
from vllm_omni_plugin.families.bagel.positions import bagel_positions, mrope_section

# float32 engine vs float64 reference, measured max |diff|: 3.3e-6 (logprobs), 2.4e-6 (K/V).
TOL = 5e-5  # as test_bagel_mm_prefix
KV_TOL = 1e-4  # as test_kv_connector

WRAPPED = "<|vision_start|><|image_pad|><|vision_end|><|im_start|>{}<|im_end|><|im_start|>"
BARE = "<|image_pad|><|im_start|>{}<|im_end|><|im_start|>"  # vLLM's chat placeholder: markers are added
# > 64 tokens of text before the image: the image block is prefilled in a later chunk than the text.
LONG = "<|im_start|>" + " ".join(f"word{i}" for i in range(40)) + "<|im_end|>" + WRAPPED


@pytest.fixture(scope="module")
def reference(checkpoint) -> BagelUnderstanding:
    return BagelUnderstanding(checkpoint("bagel"))


@pytest.fixture(scope="module", autouse=True)
def _config_hook():
    # The plugin's register() must do this in the process that builds the engine
    # config (test_register_installs_the_config_hook); idempotent.
    register_config_hook()


def max_diff(got: dict, want: dict) -> float:
    assert got["tokens"] == want["tokens"]
    return max(np.abs(got["prompt"] - want["prompt"]).max(), np.abs(got["logprobs"] - want["logprobs"]).max())


@torch.no_grad()
def reference_kv(reference: BagelUnderstanding, ids: list[int], images: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each (tokens, kv_heads, head_dim), of the prompt in BAGEL's layout (post-norm, post-RoPE)."""
    llm, captured = reference.llm, {}

    def with_cache(**kwargs):
        out = llm(**kwargs, use_cache=True)
        captured["cache"] = out.past_key_values
        return out

    reference.llm = type("Capture", (), {"__call__": staticmethod(with_cache), "__getattr__": lambda self, n: getattr(llm, n)})()
    try:
        reference.logits(reference.sequence(ids, "bagel"), [reference.image_embeds(im) for im in images])
    finally:
        reference.llm = llm
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in captured["cache"].layers]


# ------------------------------------------------------------------ no engine


def test_positions_equal_the_references_bagel_layout(reference):
    tok = reference.tok
    pad = reference.ids["<|image_pad|>"]
    for text in (WRAPPED.format("Describe the image"), LONG.format("What color?"), "<|im_start|>text only<|im_end|>"):
        ids = [t for i in tok(text)["input_ids"] for t in ([i] * 16 if i == pad else [i])]
        seq = reference.sequence(ids, "bagel")
        positions, next_position = bagel_positions(len(ids), [(s, e - s + 1) for s, e in seq.bidirectional])
        assert positions == seq.positions and next_position == seq.positions[-1] + 1


def test_positions_of_two_blocks_and_bad_blocks():
    assert bagel_positions(9, [(5, 3), (1, 2)]) == ([0, 1, 1, 2, 3, 4, 4, 4, 5], 6)
    with pytest.raises(ValueError, match="overlaps"):
        bagel_positions(9, [(1, 3), (2, 2)])
    with pytest.raises(ValueError, match="leaves"):
        bagel_positions(4, [(2, 3)])


def test_config_hook_declares_mrope_for_omni_bagel_only(checkpoint):
    from vllm.transformers_utils.config import uses_mrope
    from vllm.transformers_utils.configs.bagel import BagelConfig

    config = BagelConfig.from_pretrained(str(checkpoint("bagel")))
    assert not uses_mrope(config)  # vLLM's own Bagel: 1-D positions
    section = enable_bagel_mrope(config)
    assert uses_mrope(config) and section == mrope_section(64) == [8, 12, 12]
    assert config.llm_config.rope_parameters["mrope_section"] == section
    assert enable_bagel_mrope(config) == section  # idempotent
    assert mrope_section(128) == [16, 24, 24]  # BAGEL-7B's head_dim: Qwen2-VL's split


def test_register_config_hook_is_idempotent_and_keeps_foreign_entries(monkeypatch):
    from vllm.model_executor.models import config as vllm_models_config

    register_config_hook()
    ours = vllm_models_config.MODELS_CONFIG_MAP[ARCHITECTURE]
    register_config_hook()
    assert vllm_models_config.MODELS_CONFIG_MAP[ARCHITECTURE] is ours
    monkeypatch.setitem(vllm_models_config.MODELS_CONFIG_MAP, ARCHITECTURE, vllm_models_config.VerifyAndUpdateConfig)
    with pytest.raises(RuntimeError, match="already"):
        register_config_hook()


def test_register_installs_the_config_hook():
    """The plugin's register() (what vLLM runs before it builds the config) installs the hook."""
    code = (
        "from vllm_omni_plugin.plugin import register; register()\n"
        "from vllm.model_executor.models.config import MODELS_CONFIG_MAP\n"
        f"assert {ARCHITECTURE!r} in MODELS_CONFIG_MAP, 'register() did not install the M-RoPE config hook'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------ real engines

@pytest.mark.engine
def test_omni_bagel_img2text_equals_bagels_layout(bagel_kv_llm, reference):
    """Wrapped and bare image placeholders, a text-only prompt and an image after 64+ text tokens, one batch."""
    llm, _ = bagel_kv_llm
    requests = [
        {"prompt": WRAPPED.format("Describe the image"), "multi_modal_data": {"image": picture(1)}},
        {"prompt": BARE.format("What color is it?"), "multi_modal_data": {"image": picture(2)}},
        "<|im_start|>A red cat sitting on a blue chair<|im_end|><|im_start|>",
        {"prompt": LONG.format("Describe the image"), "multi_modal_data": {"image": picture(3)}},
    ]
    images = [[picture(1)], [picture(2)], [], [picture(3)]]
    outs = llm.generate(requests, sampling(), use_tqdm=False)
    start, pad, end = (reference.ids[t] for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    for out, ims in zip(outs, images):
        got = vllm_result(out)
        if ims:  # both placeholder forms become one block with one pair of markers
            i = got["ids"].index(pad)
            assert got["ids"][i - 1] == start and got["ids"].count(start) == 1 and got["ids"][i + 16] == end
        assert max_diff(got, reference_result(reference, got["ids"], ims, "bagel")) < TOL
    assert outs[3].prompt_token_ids.index(start) > 64  # the image block came in a later prefill step


@pytest.mark.engine
def test_vllms_bagel_keeps_its_layout(bagel_llm, bagel_kv_llm, reference):
    """Same request through both architectures: each equals its own layout, and the layouts differ by far more than TOL."""
    request = {"prompt": WRAPPED.format("Describe the image"), "multi_modal_data": {"image": picture(1)}}
    upstream = vllm_result(bagel_llm.generate([request], sampling(), use_tqdm=False)[0])
    omni = vllm_result(bagel_kv_llm[0].generate([request], sampling(), use_tqdm=False)[0])
    assert upstream["ids"] == omni["ids"]
    assert max_diff(upstream, reference_result(reference, upstream["ids"], [picture(1)], "vllm")) < TOL
    bagel = reference_result(reference, omni["ids"], [picture(1)], "bagel")
    assert max_diff(omni, bagel) < TOL
    assert np.abs(upstream["prompt"] - bagel["prompt"]).max() > 100 * TOL


@pytest.mark.engine
def test_transferred_img2text_context_is_bagels(bagel_kv_llm, reference):
    """The prompt K/V and metadata the connector hands over for an image prompt, in BAGEL's layout."""
    from vllm import SamplingParams

    from vllm_omni_plugin.kv.store import request_params, take_transferred

    llm, _ = bagel_kv_llm
    params = SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kv_transfer_params": request_params()})
    out = llm.generate([{"prompt": LONG.format("Describe the image"), "multi_modal_data": {"image": picture(3)}}], params, use_tqdm=False)[0]
    t = take_transferred(out.kv_transfer_params)
    ids = list(out.prompt_token_ids)
    seq = reference.sequence(ids, "bagel")
    (block_start, block_end), = seq.bidirectional
    assert t.metadata["latent_position"] == seq.positions[-1] + 1 == len(ids) - 17  # 18 block rows share one position
    assert t.metadata["image_token_ranges"] == [[block_start, block_end - block_start + 1]]
    assert t.metadata["image_shapes"] == [[56, 56]]
    want = reference_kv(reference, ids, [picture(3)])
    for layer, (k, v) in enumerate(want):
        torch.testing.assert_close(t.keys[layer], k.float(), rtol=KV_TOL, atol=KV_TOL, msg=f"K layer {layer}")
        torch.testing.assert_close(t.values[layer], v.float(), rtol=KV_TOL, atol=KV_TOL, msg=f"V layer {layer}")
