"""Patch: engines that hand their KV over run a CPU attention kernel whose cache layout we read.

vLLM's CPU attention metadata builder picks a kernel ISA per KV-cache group
(`_get_attn_isa`) and gives it to the group's layers (`_set_isa_to_layers`);
each kernel packs the paged cache its own way. The omni KV hand-over
(OmniKVConnector) reads that cache, so a kernel whose packing
`vllm_omni_plugin.kv.layout` does not read (`kv.cpu_isa.cpu_layout` finds out
by writing through it) would hand the DiT stage scrambled keys. The
replacement keeps vLLM's choice whenever its layout is known -- every kernel of
vLLM 0.32 today -- and otherwise switches the group to the portable vec / vec16
kernel, logging one line; engines without OmniKVConnector are never touched.
"""

from __future__ import annotations

import functools

from . import Patch


def _hands_kv_over(vllm_config) -> bool:
    from vllm_omni_plugin.kv import CONNECTOR_NAME

    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return getattr(transfer, "kv_connector", None) == CONNECTOR_NAME


def _make_replacement(original):
    from vllm_omni_plugin.vllm_moves import vllm_symbol

    is_quantized_kv_cache = vllm_symbol("is_quantized_kv_cache")  # moved in vLLM 0.33 (vllm_moves.py)

    @functools.wraps(original)
    def _set_isa_to_layers(self, layer_names):
        if _hands_kv_over(self.vllm_config) and not is_quantized_kv_cache(self.kv_cache_dtype):
            from vllm_omni_plugin.kv.cpu_isa import known_layout_isa

            chosen = known_layout_isa(self.isa, self.dtype, self.head_dim, self.block_size)
            if chosen != self.isa:
                from vllm.logger import init_logger

                init_logger("vllm.omni_plugin").info_once(
                    "CPU attention: kernel %r writes a KV layout the omni KV hand-over does not read; using %r "
                    "(head_dim %d, block_size %d, %s) (vllm-omni-plugin patch cpu_attn_known_kv_layout).",
                    self.isa, chosen, self.head_dim, self.block_size, self.dtype,
                )
                self.isa = chosen
        return original(self, layer_names)

    return _set_isa_to_layers


PATCH = Patch(
    name="cpu_attn_known_kv_layout",
    target="vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder._set_isa_to_layers",
    why=(
        "Each CPU attention kernel (vec, vec16, amx, neon, vxe, vsx, rvv) packs the paged KV cache its own "
        "way; the omni KV hand-over reads it, so an engine with OmniKVConnector must run a kernel whose "
        "layout vllm_omni_plugin.kv.layout reads, on every CPU, instead of refusing to start."
    ),
    how=(
        "Before the original hands the builder's ISA to its layers: for engines whose kv_connector is "
        "OmniKVConnector (and an unquantized cache), keep vLLM's ISA when kv.cpu_isa.cpu_layout (a write "
        "through cpu_attn_reshape_and_cache, read back by kv.layout) knows its layout; otherwise set the "
        "builder's ISA to the portable vec (block_size % 32 == 0) or vec16 kernel, logging one line. The "
        "builder's later scheduler metadata uses the same self.isa. Other engines are untouched."
    ),
    upstream=(
        "Not a vLLM bug: vLLM reads its own layouts. Upstream could expose a kernel-independent "
        "read-out of a CPU_ATTN block (the inverse of cpu_attn_reshape_and_cache); not proposed yet."
    ),
    checked=("0.32.0",),
    signature="(self, layer_names: list[str]) -> None",
    # is_quantized_kv_cache too, through vllm_moves (it moved in 0.33; the moved-symbol contract checks it)
    requires=("vllm._custom_ops:cpu_attn_reshape_and_cache",),
    make_replacement=_make_replacement,
    platforms=("cpu",),
)
