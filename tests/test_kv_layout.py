"""`kv.layout.gather_kv` against the way each attention backend writes its cache.

CPU: the cache is filled by vLLM's own CPU kernel (`cpu_attn_reshape_and_cache`,
the op CPU_ATTN's `do_kv_cache_update` runs) on a cache of the backend's
shape; that is how the transposed key pages were found. CUDA backends cannot run here, so their cache is filled through the
exact expression their forward uses to split it into K and V
(`kv_cache.transpose(1, 2).split(head_size, dim=-1)`), which is the fact the
layout encodes. Legacy layouts are filled by indexing their K/V planes.
"""

from __future__ import annotations

import pytest
import torch

from vllm_omni_plugin.kv.layout import LAYOUTS, gather_kv, layout_for_backend, slot_mapping, split_kv

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 5, 2, 32, 64


def _tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, HEADS, HEAD_DIM, generator=g)
    v = torch.randn(n, HEADS, HEAD_DIM, generator=g)
    # a request's blocks are scattered and out of order in a real cache
    slots = slot_mapping([3, 0, 4], BLOCK_SIZE, n)
    return k, v, slots


def test_slot_mapping():
    assert slot_mapping([2, 0], 4, 6).tolist() == [8, 9, 10, 11, 0, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        slot_mapping([1], 4, 5)


@pytest.mark.parametrize("block_size", [BLOCK_SIZE, 128])
@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_cpu_backend_cache_written_by_vllms_kernel(isa, block_size):
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(3)
    n = block_size + 9  # spans two blocks, the second one partly
    k, v = torch.randn(n, HEADS, HEAD_DIM, generator=g), torch.randn(n, HEADS, HEAD_DIM, generator=g)
    slots = slot_mapping([2, 0], block_size, n)
    cache = torch.zeros(3, HEADS, block_size, 2 * HEAD_DIM)  # CPU_ATTN's [B, H, N, 2D]
    # exactly CPUAttentionBackendImpl.do_kv_cache_update
    key_cache, value_cache = cache.view(3, HEADS, 2 * block_size, HEAD_DIM).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

    gk, gv = gather_kv(cache, layout_for_backend("CPU_ATTN", isa), HEAD_DIM, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)
    # reading the same bytes as a CUDA backend's cache is wrong: the layouts really differ
    wk, wv = gather_kv(cache, "token_packed", HEAD_DIM, slots)
    assert not torch.equal(wk, k) and not torch.equal(wv, v)


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_cuda_backend_cache_as_their_forward_splits_it(backend, physical):
    k, v, slots = _tokens(70, seed=1)
    if physical == "LBNHC":  # token-major memory (FlashAttention's default), same logical view
        cache = torch.zeros(BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).transpose(1, 2)
    else:
        cache = torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)  # (B, N, H, D) views
    key_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k
    value_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v

    gk, gv = gather_kv(cache, layout_for_backend(backend), HEAD_DIM, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layout, shape, planes",
    [
        ("kv_first", (2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), lambda c: (c[0], c[1])),
        ("block_first", (BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM), lambda c: (c[:, 0], c[:, 1])),
        ("block_first_hnd", (BLOCKS, 2, HEADS, BLOCK_SIZE, HEAD_DIM),
         lambda c: (c[:, 0].transpose(1, 2), c[:, 1].transpose(1, 2))),
    ],
)
def test_legacy_plane_layouts(layout, shape, planes):
    k, v, slots = _tokens(40, seed=2)
    cache = torch.zeros(shape)
    key_cache, value_cache = planes(cache)  # (B, N, H, D) views
    key_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k
    value_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v
    gk, gv = gather_kv(cache, layout, HEAD_DIM, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)


def test_every_layout_is_a_view_and_bad_input_is_named():
    shapes = {"kv_first": (2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM), "block_first": (BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM),
              "block_first_hnd": (BLOCKS, 2, HEADS, BLOCK_SIZE, HEAD_DIM)}
    for layout in LAYOUTS:
        cache = torch.zeros(shapes.get(layout, (BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)))
        k, v = split_kv(cache, layout, HEAD_DIM)
        assert k.shape == v.shape == (BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
        assert k.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()  # no copy of the cache
    with pytest.raises(ValueError, match="unknown KV layout"):
        split_kv(torch.zeros(1), "nope", HEAD_DIM)
    with pytest.raises(ValueError, match="MAMBA"):
        layout_for_backend("MAMBA")
    with pytest.raises(ValueError, match="'amx'"):
        layout_for_backend("CPU_ATTN", "amx")
    with pytest.raises(ValueError, match="not a cpu_vec cache"):
        split_kv(torch.zeros(BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).transpose(1, 2), "cpu_vec", HEAD_DIM)
    with pytest.raises(ValueError, match="not a token_packed cache"):
        split_kv(torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), "token_packed", 32)
