"""OmniKVConnector on a real vLLM CPU engine (tiny BAGEL as OmniBagelForConditionalGeneration).

Oracle for the transferred K/V: transformers' Qwen3 on the same checkpoint
weights (BAGEL's LLM is Qwen2 with per-head q/k RMSNorm, which is Qwen3's
attention; see test_bagel_vllm._transformers_llm), whose cache holds post-norm,
post-RoPE keys as vLLM's does. Both run float32; the tolerance (1e-4) covers
kernel differences (~1e-6 seen) and is far below any real mismatch (a wrong
token, position or layer gives O(1) differences).

The engine runs chunked prefill with 64 tokens per step, so a 150-token prompt
is prefilled over three steps and a short request that arrives after it
finishes first (principle 6: metadata keyed by request id, never by order).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from test_bagel_vllm import IMAGE_PROMPT, _transformers_llm  # the transformers oracle of BAGEL's LLM
from vllm_omni_plugin.kv.store import PARAMS_KEY, KVTransferStore, request_params, take_transferred

pytestmark = pytest.mark.engine

LONG = "<|im_start|>" + " ".join(f"word{i}" for i in range(60)) + "<|im_end|>"
SHORT = "<|im_start|>A red cat<|im_end|>"


def _params(n: int, transfer: bool = True):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": request_params()} if transfer else None
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, extra_args=extra)


def _is_metadata_source(model) -> bool:
    """Runs in the worker: the model registered itself as the connector's metadata source."""
    from vllm_omni_plugin.kv.connector import metadata_source

    return metadata_source() is model


def _run_in_order(llm, requests: list[tuple[str, object, object]]) -> tuple[list[str], dict]:
    """Add requests in this order, step the engine; return (finish order, outputs by id)."""
    engine = llm.llm_engine
    for req_id, prompt, params in requests:
        engine.add_request(req_id, prompt, params)
    order, outputs = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                outputs[out.request_id] = out
    return order, outputs


@torch.no_grad()
def _reference_kv(model, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) as (tokens, kv_heads, head_dim) from transformers."""
    cache = model(torch.tensor([token_ids]), use_cache=True).past_key_values
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in cache.layers]


def test_startup_and_untagged_requests_leave_nothing(bagel_kv_llm):
    """Profiling / warm-up forwards ran at start-up; a request that does not opt in is untouched."""
    llm, transfer_dir = bagel_kv_llm
    assert llm.apply_model(_is_metadata_source) == [True]
    assert len(KVTransferStore(transfer_dir)) == 0
    out = llm.generate([SHORT], _params(2, transfer=False), use_tqdm=False)[0]
    assert not (out.kv_transfer_params or {}).get(PARAMS_KEY)
    assert len(KVTransferStore(transfer_dir)) == 0
    assert llm.apply_model(_is_metadata_source) == [True]


def test_prompt_kv_and_metadata_keyed_by_request(bagel_kv_llm, checkpoint):
    llm, transfer_dir = bagel_kv_llm
    tok = llm.get_tokenizer()
    image = Image.new("RGB", (40, 24), (20, 200, 90))
    requests = [
        ("req-long", LONG, _params(6)),  # arrives first, prefilled over 3 steps, finishes last
        ("req-short", SHORT, _params(1)),
        ("req-image", {"prompt": "<|im_start|>" + IMAGE_PROMPT + "<|im_end|>", "multi_modal_data": {"image": image}}, _params(3)),
    ]
    order, outs = _run_in_order(llm, requests)
    assert order.index("req-short") < order.index("req-long")  # finish order != arrival order
    assert order.index("req-image") < order.index("req-long")

    store = KVTransferStore(transfer_dir)
    assert len(store) == 3
    reference = _transformers_llm(checkpoint("bagel"))
    got = {}
    for req_id, out in outs.items():
        report = out.kv_transfer_params[PARAMS_KEY]
        ids = list(out.prompt_token_ids)
        assert report["status"] == "saved" and report["num_tokens"] == len(ids)
        got[req_id] = t = take_transferred(out.kv_transfer_params)
        # keyed by the engine's id for this request (vLLM appends a suffix to ours)
        assert t.request_id == report["request_id"] and t.request_id.startswith(req_id + "-")
        assert t.num_tokens == len(ids)
        # BAGEL positions: each image block (markers included) takes ONE position.
        expected = len(ids) - sum(n - 1 for _, n in t.metadata["image_token_ranges"])
        assert t.metadata["latent_position"] == expected  # each request its own, whatever the order
        assert len(t.keys) == len(t.values) == 2  # every layer
        assert t.keys[0].shape == (len(ids), 1, 64)  # (tokens, kv_heads, head_dim)
    assert len(store) == 0  # consumption frees the storage
    assert llm.apply_model(_is_metadata_source) == [True]

    assert got["req-long"].num_tokens > 128  # really spans three 64-token prefill steps
    assert got["req-short"].metadata["image_shapes"] == got["req-long"].metadata["image_shapes"] == []
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = list(outs["req-image"].prompt_token_ids)
    assert got["req-image"].metadata["image_shapes"] == [[56, 56]]  # the tiny ViT's input
    # The range covers the whole block: <|vision_start|>, the pads, <|vision_end|>.
    assert got["req-image"].metadata["image_token_ranges"] == [[ids.index(pad) - 1, ids.count(pad) + 2]]

    for req_id in ("req-long", "req-short"):  # text prompts: exact oracle
        t = got[req_id]
        for layer, (k, v) in enumerate(_reference_kv(reference, list(outs[req_id].prompt_token_ids))):
            torch.testing.assert_close(t.keys[layer], k, rtol=1e-4, atol=1e-4, msg=f"{req_id} K layer {layer}")
            torch.testing.assert_close(t.values[layer], v, rtol=1e-4, atol=1e-4, msg=f"{req_id} V layer {layer}")
    # The image request's text prefix (before the image block's start marker) is causal text: same oracle.
    prefix = ids.index(pad) - 1
    ref = _reference_kv(reference, ids[:prefix])
    torch.testing.assert_close(got["req-image"].keys[1][:prefix], ref[1][0], rtol=1e-4, atol=1e-4)


def test_transfer_is_the_context_the_diffusion_stage_expects(bagel_kv_llm, checkpoint):
    """The consumer contract: a text2img cond context through vLLM + the connector equals
    the diffusion stage's own vLLM-free prefill (`encode_context`) as a `BranchKV`."""
    from vllm_omni_plugin.families.bagel.dit import BranchKV, encode_context, load_bagel_model

    llm, _ = bagel_kv_llm
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.max_num_batched_tokens == 64 and scheduler.enable_chunked_prefill  # the engine chunks as the tests assume

    prompt = "A red cat sitting on a blue chair"
    out = llm.generate(["<|im_start|>" + prompt + "<|im_end|>"], _params(1), use_tqdm=False)[0]
    t = take_transferred(out.kv_transfer_params)
    branch = BranchKV(t.keys, t.values, t.metadata["latent_position"])

    expected = encode_context(load_bagel_model(checkpoint("bagel")), "x", prompt, height=64, width=64).cond
    assert (branch.num_tokens, branch.latent_position) == (expected.num_tokens, expected.latent_position)
    for layer in range(expected.num_layers):
        torch.testing.assert_close(branch.keys[layer], expected.keys[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(branch.values[layer], expected.values[layer], rtol=1e-4, atol=1e-4)
