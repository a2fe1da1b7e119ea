"""`kv.layout.gather_kv` against the way each attention backend writes its cache.

CPU: every kernel vLLM 0.32's CPU_ATTN can pick (vec, vec16, amx, neon with and
without BFMMLA, vxe, vsx, rvv) gets a synthetic cache packed element by element
from the kernel's own indexing (`reshape_and_cache` in csrc/cpu/cpu_attn_*.hpp),
written here independently of the readers in kv/layout.py, so a wrong reader
fails on any CPU. Where this machine's CPU and vLLM build have the kernel, the
kernel itself (`cpu_attn_reshape_and_cache`, the op `do_kv_cache_update` runs)
writes the cache too, and must write exactly the synthetic bytes. CUDA backends
cannot run here, so their cache is filled through the exact expression their
forward uses to split it into K and V (`kv_cache.transpose(1, 2).split(head_size,
dim=-1)`). Legacy layouts are filled by indexing their K/V planes.
"""

from __future__ import annotations

import logging
import platform

import pytest
import torch

from vllm_omni_plugin.kv.cpu_isa import cpu_flags, cpu_lacks, cpu_layout, known_layout_isa, write_through_kernel
from vllm_omni_plugin.kv.layout import LAYOUTS, cpu_isa_layouts, gather_kv, layout_for_backend, slot_mapping

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 5, 2, 32, 64
CPU_LAYOUTS = ("cpu_vec", "cpu_amx", "cpu_neon_bfmmla")
ISAS = ("vec", "vec16", "amx", "neon", "vxe", "vsx", "rvv")


def _tokens(n: int, seed: int = 0, dtype=torch.float32, head_dim=HEAD_DIM):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, HEADS, head_dim, generator=g).to(dtype)
    v = torch.randn(n, HEADS, head_dim, generator=g).to(dtype)
    return k, v


# ---- the kernels' indexing, one element at a time (offsets inside a page's key / value tile) ----------

def _vec_offsets(t, h, n, d, itemsize):
    return h * n + t, t * d + h  # K column-major [head_dim, block_size]; V row-major (cpu_attn_vec.hpp)


def _amx_offsets(t, h, n, d, itemsize):
    # cpu_attn_amx.hpp: K in int32 "quadwords" of p elements, tokens in groups of 16, word j of a token
    # at group * 16 * (d / p) + j * 16 + token-in-group; V: head elements in groups of 16, each group a
    # (n, 16) tile with token pairs (p) interleaved into words.
    p = 4 // itemsize
    k_word = (t // 16) * 16 * (d // p) + (h // p) * 16 + t % 16
    v_off = (h // 16) * n * 16 + (t // p) * p * 16 + (h % 16) * p + t % p
    return k_word * p + h % p, v_off


def _bfmmla_offsets(t, h, n, d, itemsize):
    # cpu_attn_neon_bfmmla.hpp: K_TOKENS_PER_GROUP 8, TILE_K 4, K_INNER_STRIDE 32, V_INNER_STRIDE 8,
    # V_TOKENS_PER_ROW_BLOCK 4, TILE_COLS 2.
    k_off = (t // 8) * (d // 4) * 32 + (h // 4) * 32 + ((t % 8) // 2) * 8 + (t % 2) * 4 + h % 4
    v_off = (h // 2) * (n // 4) * 8 + (t // 4) * 8 + (h % 2) * 4 + t % 4
    return k_off, v_off


_OFFSETS = {"cpu_vec": _vec_offsets, "cpu_amx": _amx_offsets, "cpu_neon_bfmmla": _bfmmla_offsets}


def _pack(layout, k, v, slots, blocks, block_size):
    """A CPU_ATTN cache [blocks, heads, block_size, 2 * head_dim] written by `layout`'s kernel indexing."""
    n_tok, heads, d = k.shape
    page = block_size * d
    flat = torch.zeros(blocks, heads, 2 * page, dtype=k.dtype)
    block, t = (slots // block_size)[:, None], (slots % block_size)[:, None]  # per (token, head element)
    h = torch.arange(d)[None, :]
    k_off, v_off = _OFFSETS[layout](t, h, block_size, d, k.element_size())
    for head in range(heads):
        flat[block, head, k_off] = k[:, head]
        flat[block, head, page + v_off] = v[:, head]
    return flat.view(blocks, heads, block_size, 2 * d)


def test_slot_mapping():
    assert slot_mapping([2, 0], 4, 6).tolist() == [8, 9, 10, 11, 0, 1]
    with pytest.raises(ValueError, match="cannot hold"):
        slot_mapping([1], 4, 5)


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, head_dim", [(32, 64), (64, 128), (32, 96)])
def test_every_cpu_kernel_layout_reads_back_a_synthetic_cache(layout, dtype, block_size, head_dim):
    n = block_size + 9  # a whole block and part of another, scattered as a real request's blocks are
    k, v = _tokens(n, seed=block_size + head_dim, dtype=dtype, head_dim=head_dim)
    slots = slot_mapping([2, 0], block_size, n)
    cache = _pack(layout, k, v, slots, 3, block_size)
    gk, gv = gather_kv(cache, layout, head_dim, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)
    # the layouts really differ: reading these bytes as any other layout is wrong
    for other in CPU_LAYOUTS + ("token_packed",):
        if other != layout:
            wk, wv = gather_kv(cache, other, head_dim, slots)
            assert not torch.equal(wk, k) and not torch.equal(wv, v), other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
def test_vllms_own_kernel_writes_the_layout_we_read(isa, dtype):
    """The probe runs where this CPU and this vLLM build have the kernel, and is skipped (with why) elsewhere."""
    if (reason := cpu_lacks(isa)) is not None:
        pytest.skip(f"{isa}: {reason} (CPU flags here: {' '.join(sorted(cpu_flags() & _X86_FLAGS)) or '-'})")
    block_size = 16 if isa == "vec16" else 32
    head_dim = 80 if isa == "vec16" else HEAD_DIM
    try:
        cache, k, v, slots = write_through_kernel(isa, dtype, head_dim, block_size)
    except RuntimeError as e:
        pytest.skip(f"this vLLM build has no {isa} kernel for head_dim {head_dim}: {str(e).splitlines()[0]}")
    layout = cpu_layout(isa, dtype, head_dim, block_size)
    assert layout in cpu_isa_layouts(isa, dtype)
    gk, gv = gather_kv(cache, layout, head_dim, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)
    # and the synthetic packer above is the kernel's packing, byte for byte
    assert torch.equal(_pack(layout, k, v, slots, cache.shape[0], block_size), cache)


_X86_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "bf16"})


def test_cpu_layout_and_the_kernel_chosen_when_the_layout_is_unknown():
    assert cpu_layout("vec", torch.bfloat16, 64, 32) == "cpu_vec"
    assert cpu_layout("vec16", torch.float32, 80, 16) == "cpu_vec"
    assert cpu_layout("no-such-kernel", torch.float32, 64, 32) is None
    assert cpu_isa_layouts("no-such-kernel", torch.float32) == ()
    # what vLLM picks on an AMX CPU for bf16 stays where its layout is verified here, else vec
    amx_here = cpu_layout("amx", torch.bfloat16, 64, 32) is not None
    assert known_layout_isa("amx", torch.bfloat16, 64, 32) == ("amx" if amx_here else "vec")
    assert amx_here == (cpu_lacks("amx") is None and cpu_layout("amx", torch.bfloat16, 64, 32) == "cpu_amx")
    assert known_layout_isa("vec", torch.float32, 64, 32) == "vec"
    assert known_layout_isa("neon", torch.float32, 64, 16) == ("neon" if platform.machine() == "aarch64" else "vec16")
    with pytest.raises(ValueError, match="no CPU attention kernel"):
        known_layout_isa("no-such-kernel", torch.float32, 64, 8)  # no kernel takes blocks of 8


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_cuda_backend_cache_as_their_forward_splits_it(backend, physical):
    k, v = _tokens(70, seed=1)
    slots = slot_mapping([3, 0, 4], BLOCK_SIZE, 70)
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
    k, v = _tokens(40, seed=2)
    slots = slot_mapping([3, 0, 4], BLOCK_SIZE, 40)
    cache = torch.zeros(shape)
    key_cache, value_cache = planes(cache)  # (B, N, H, D) views
    key_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k
    value_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v
    gk, gv = gather_kv(cache, layout, HEAD_DIM, slots)
    torch.testing.assert_close(gk, k, rtol=0, atol=0)
    torch.testing.assert_close(gv, v, rtol=0, atol=0)


def test_bad_input_is_named():
    assert set(CPU_LAYOUTS) < set(LAYOUTS)
    slots = slot_mapping([0], BLOCK_SIZE, 3)
    with pytest.raises(ValueError, match="unknown KV layout"):
        gather_kv(torch.zeros(1), "nope", HEAD_DIM, slots)
    with pytest.raises(ValueError, match="MAMBA"):
        layout_for_backend("MAMBA")
    # a token-major cache is not a CPU_ATTN cache: its pages are not contiguous, so the view refuses it
    with pytest.raises(ValueError, match="not a cpu_vec cache"):
        gather_kv(torch.zeros(BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).transpose(1, 2), "cpu_vec", HEAD_DIM, slots)
    with pytest.raises(ValueError, match="not a cpu_amx cache"):
        gather_kv(torch.zeros(BLOCKS, HEADS, 24, 2 * HEAD_DIM), "cpu_amx", HEAD_DIM, slot_mapping([0], 24, 3))
    with pytest.raises(ValueError, match="not a token_packed cache"):
        gather_kv(torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), "token_packed", 32, slots)


def _builder(vllm_config, isa):
    """vLLM's CPU attention metadata builder as its __init__ leaves it just before `_set_isa_to_layers`."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    builder = CPUAttentionMetadataBuilder.__new__(CPUAttentionMetadataBuilder)
    builder.vllm_config, builder.isa, builder.dtype = vllm_config, isa, torch.bfloat16
    builder.head_dim, builder.block_size, builder.kv_cache_dtype = HEAD_DIM, BLOCK_SIZE, "auto"
    return builder


def test_patch_runs_omni_engines_on_a_kernel_whose_layout_is_known():
    """What vLLM picks on an AMX CPU for bf16 ('amx'): kept where verified, else vec; other engines untouched."""
    from vllm.config import KVTransferConfig, VllmConfig

    from vllm_omni_plugin.kv import CONNECTOR_NAME, register_connector
    from vllm_omni_plugin.patches import apply_all

    apply_all()
    register_connector()
    omni = _builder(VllmConfig(kv_transfer_config=KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_producer")),
                    "amx")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vllm.omni_plugin")
    level, logger.level = logger.level, logging.INFO  # what vLLM's logging config gives it in an engine
    logger.addHandler(handler)
    try:
        omni._set_isa_to_layers([])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    amx_here = cpu_layout("amx", torch.bfloat16, HEAD_DIM, BLOCK_SIZE) == "cpu_amx"
    assert omni.isa == ("amx" if amx_here else "vec")
    if not amx_here:
        assert lines == [lines[0]] and "kernel 'amx' writes a KV layout the omni KV hand-over does not read; " \
            "using 'vec'" in lines[0]
    plain = _builder(VllmConfig(), "amx")
    plain._set_isa_to_layers([])
    assert plain.isa == "amx"  # no OmniKVConnector: vLLM's choice stands, whatever its layout
