"""The CPU mm-prefix attention patches at kernel level: vLLM's real CPU backend, no engine.

One batch mixes the cases the engine produces: a text-only prefill, a fresh
prefill with an image, a prefix-cache hit that ends inside an image, a decode
row after an image, a prefill chunk that stops before its image, and two
images in one request. The paged KV cache is filled with vLLM's own kernel.
Oracle: dense attention over the same keys with vLLM's mm-prefix rule (query i
sees key j iff j <= i or both lie in the same image span).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from vllm_omni_plugin.patches import ORIGINAL, _cpu_mm_prefix

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 1, 64, 32


@dataclasses.dataclass
class Req:
    seq_len: int  # tokens computed after this step
    query_len: int  # tokens scheduled this step
    spans: list[tuple[int, int]]  # inclusive image positions


BATCH = [
    Req(20, 20, []),  # text-only prefill
    Req(30, 30, [(5, 20)]),  # fresh prefill with one image
    Req(50, 18, [(10, 41)]),  # prefix-cache hit of 32 tokens ends inside the image
    Req(40, 1, [(3, 18)]),  # decode after an image
    Req(12, 12, [(20, 35)]),  # prefill chunk that stops before its image
    Req(30, 30, [(2, 9), (15, 24)]),  # two images
]


@pytest.fixture(scope="module")
def backend(checkpoint):
    """(builder, impl, layer) of vLLM's CPU attention backend, patches applied."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends import cpu_attn

    from vllm_omni_plugin.plugin import register

    register()
    config = VllmConfig(model_config=ModelConfig(model=str(checkpoint("bagel")), dtype="float32"))
    with set_current_vllm_config(config):
        impl = cpu_attn.CPUAttentionBackendImpl(
            num_heads=HEADS, head_size=HEAD_DIM, scale=1 / math.sqrt(HEAD_DIM), num_kv_heads=KV_HEADS,
            alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
        )
    isa = _isa()
    # The builder's constructor walks a model's layers; the attributes build() reads are set directly.
    builder = object.__new__(cpu_attn.CPUAttentionMetadataBuilder)
    vars(builder).update(
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32, window_size=-1,
        block_size=BLOCK, kv_cache_dtype="auto", isa=isa, is_cross_attention=False, is_encoder_only_attention=False,
    )
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    return builder, impl, layer


def _isa() -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, BLOCK, HEAD_DIM, "auto")


def make_step(batch: list[Req], seed: int = 0):
    """Random q/k/v, a filled paged KV cache and the CommonAttentionMetadata of one step."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backend import CommonAttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = max(math.ceil(r.seq_len / BLOCK) for r in batch)
    kv_cache = torch.zeros(len(batch) * blocks_per_req + 1, KV_HEADS, BLOCK, 2 * HEAD_DIM)
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], KV_HEADS, 2 * BLOCK, HEAD_DIM).chunk(2, dim=2)
    # Request r owns blocks 1 + r*blocks_per_req ... in reverse order, so a wrong block-table row shows.
    block_table = torch.tensor(
        [[1 + r * blocks_per_req + b for b in reversed(range(blocks_per_req))] for r in range(len(batch))],
        dtype=torch.int32,
    )
    keys, values, queries, slots = [], [], [], []
    for r, req in enumerate(batch):
        k = torch.randn(req.seq_len, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(req.seq_len, KV_HEADS, HEAD_DIM, generator=gen)
        pos = torch.arange(req.seq_len)
        slot = block_table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
        # The whole context (cached part and this step's keys) is in the cache when forward runs.
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slot, _isa())
        keys.append(k), values.append(v), slots.append(slot[req.seq_len - req.query_len :])
        queries.append(torch.randn(req.query_len, HEADS, HEAD_DIM, generator=gen))
    query_lens = torch.tensor([r.query_len for r in batch], dtype=torch.int32)
    query_start_loc = torch.zeros(len(batch) + 1, dtype=torch.int32)
    torch.cumsum(query_lens, 0, out=query_start_loc[1:])
    query = torch.cat(queries)
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=torch.tensor([r.seq_len for r in batch], dtype=torch.int32),
        num_reqs=len(batch), num_actual_tokens=query.shape[0], max_query_len=int(query_lens.max()),
        max_seq_len=max(r.seq_len for r in batch), block_table_tensor=block_table,
        slot_mapping=torch.cat(slots), causal=True,
        mm_req_doc_ranges={i: r.spans for i, r in enumerate(batch) if r.spans} or None,
    )
    new_keys = torch.cat([k[r.seq_len - r.query_len :] for k, r in zip(keys, batch)])
    new_values = torch.cat([v[r.seq_len - r.query_len :] for v, r in zip(values, batch)])
    return SimpleNamespace(
        query=query, key=new_keys, value=new_values, kv_cache=kv_cache, common=common, keys=keys, values=values
    )


def dense_reference(step, batch: list[Req], *, mm_prefix: bool) -> torch.Tensor:
    """Attention with vLLM's mm-prefix rule (or plain causal), in float64."""
    outs, row = [], 0
    for r, req in enumerate(batch):
        q = step.query[row : row + req.query_len].double()
        k, v = step.keys[r].double(), step.values[r].double()
        qpos = torch.arange(req.seq_len - req.query_len, req.seq_len)[:, None]
        kpos = torch.arange(req.seq_len)[None, :]
        allowed = kpos <= qpos
        if mm_prefix:
            for s, e in req.spans:
                allowed |= (qpos >= s) & (qpos <= e) & (kpos >= s) & (kpos <= e)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        row += req.query_len
    return torch.cat(outs).float()


def run(backend, step, *, patched: bool = True) -> tuple[torch.Tensor, object]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder

    builder, impl, layer = backend
    build, forward = CPUAttentionMetadataBuilder.build, CPUAttentionBackendImpl.forward
    if not patched:
        build, forward = getattr(build, ORIGINAL), getattr(forward, ORIGINAL)
    metadata = build(builder, 0, step.common)
    output = torch.full_like(step.query, float("nan"))
    forward(impl, layer, step.query, step.key, step.value, step.kv_cache, metadata, output)
    return output, metadata


def image_rows(batch: list[Req]) -> torch.Tensor:
    """Rows whose causal result misses part of their image: scheduled, inside a span, before its end."""
    mask = []
    for req in batch:
        for p in range(req.seq_len - req.query_len, req.seq_len):
            mask.append(any(s <= p < e for s, e in req.spans))
    return torch.tensor(mask)


def test_patched_cpu_attention_is_bidirectional_inside_images(backend):
    step = make_step(BATCH)
    out, metadata = run(backend, step)
    torch.testing.assert_close(out, dense_reference(step, BATCH, mm_prefix=True), rtol=1e-5, atol=1e-5)
    # The plan names exactly the rows that causal attention gets wrong.
    plan = getattr(metadata, _cpu_mm_prefix.PLAN_ATTR)
    assert plan.rows.tolist() == image_rows(BATCH).nonzero().flatten().tolist()


def test_unpatched_cpu_attention_is_causal_over_images(backend):
    step = make_step(BATCH)
    out, metadata = run(backend, step, patched=False)
    assert not hasattr(metadata, _cpu_mm_prefix.PLAN_ATTR)
    torch.testing.assert_close(out, dense_reference(step, BATCH, mm_prefix=False), rtol=1e-5, atol=1e-5)
    diff = (out - dense_reference(step, BATCH, mm_prefix=True)).abs().amax(dim=(1, 2))
    assert (diff[image_rows(BATCH)] > 1e-2).all()  # the bug: every image row but the last differs


def test_rows_outside_images_are_bit_identical_to_upstream(backend):
    step = make_step(BATCH)
    patched, _ = run(backend, step)
    upstream, _ = run(backend, step, patched=False)
    keep = ~image_rows(BATCH)
    assert torch.equal(patched[keep], upstream[keep])


def test_without_ranges_nothing_changes(backend):
    # What a text-only batch or a model without mm-prefix attention hands the builder.
    step = make_step(BATCH)
    step.common = dataclasses.replace(step.common, mm_req_doc_ranges=None)
    patched, metadata = run(backend, step)
    upstream, _ = run(backend, step, patched=False)
    assert not hasattr(metadata, _cpu_mm_prefix.PLAN_ATTR)
    assert torch.equal(patched, upstream)


def test_switch_off_restores_upstream_behaviour(backend, monkeypatch):
    step = make_step(BATCH)
    monkeypatch.setenv(_cpu_mm_prefix.ENV_SWITCH, "0")
    patched, metadata = run(backend, step)
    upstream, _ = run(backend, step, patched=False)
    assert not hasattr(metadata, _cpu_mm_prefix.PLAN_ATTR)
    assert torch.equal(patched, upstream)


def test_image_split_across_steps_attends_to_what_is_computed(backend):
    # The tail of a prefix-cache hit inside an image, cut by the token budget:
    # rows see every computed key of their image (vLLM's GPU kernels do the same).
    batch = [Req(24, 8, [(10, 41)])]
    step = make_step(batch)
    out, _ = run(backend, step)
    expected = dense_reference(step, [Req(24, 8, [(10, 23)])], mm_prefix=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- cpu_mm_prefix_no_chunking (config only, no engine)


def _disable_chunked_mm_input(path, **kwargs) -> bool:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(path), dtype="float32", max_model_len=256, enforce_eager=True, **kwargs)
    return args.create_engine_config().scheduler_config.disable_chunked_mm_input


def test_cpu_never_chunks_images_of_mm_prefix_models(backend, checkpoint):
    assert _disable_chunked_mm_input(checkpoint("bagel")) is True


def test_chunking_rule_leaves_other_deployments_alone(backend, checkpoint, monkeypatch):
    from vllm.config.vllm import VllmConfig

    # Text-only serving of the same model: no mm-prefix attention, vLLM's default stays.
    assert _disable_chunked_mm_input(checkpoint("bagel"), limit_mm_per_prompt={"image": 0}) is False
    # Unpatched, the CPU platform chunks BAGEL's images (the bug the patch closes).
    monkeypatch.setattr(VllmConfig, "__post_init__", getattr(VllmConfig.__post_init__, ORIGINAL))
    assert _disable_chunked_mm_input(checkpoint("bagel")) is False
