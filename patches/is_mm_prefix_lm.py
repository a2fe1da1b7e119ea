"""Patch: `ModelConfig.is_mm_prefix_lm` also answers True for omni architectures.

vLLM decides per model whether multimodal prefix positions (image tokens)
attend bidirectionally. Its answer comes from the HF config or a fixed list of
model types (0.32 lists `bagel`). Architectures this plugin registers need the
same treatment whatever model type their config carries, so the patched
property keeps vLLM's answer and adds: True for an omni architecture that
needs mm-prefix attention, provided multimodal inputs are enabled for the
deployment (the same gate vLLM applies to its own list, so text-only serving
still may pick any attention backend).
"""

from __future__ import annotations

import functools

from . import Patch


def _make_replacement(original: functools.cached_property) -> functools.cached_property:
    upstream = original.func

    def is_mm_prefix_lm(self) -> bool:
        if upstream(self):
            return True
        # Imported here: the registry module is cheap, but keeping patch
        # modules free of import-time work keeps `import vllm` fast.
        from vllm_omni_plugin.model_registry import MM_PREFIX_ARCHITECTURES

        if not MM_PREFIX_ARCHITECTURES.intersection(self.architectures or ()):
            return False
        return self._supports_multimodal_for_mm_prefix()

    is_mm_prefix_lm.__doc__ = upstream.__doc__
    return functools.cached_property(is_mm_prefix_lm)


PATCH = Patch(
    name="is_mm_prefix_lm",
    target="vllm.config.model:ModelConfig.is_mm_prefix_lm",
    why=(
        "Omni architectures (e.g. OmniBagelForConditionalGeneration) attend "
        "bidirectionally over image tokens like BAGEL; vLLM only knows model types "
        "from its own list or an `is_mm_prefix_lm` attribute in the HF config."
    ),
    how=(
        "Replace the cached_property with one that returns vLLM's own answer, or "
        "True for an architecture in model_registry.MM_PREFIX_ARCHITECTURES when "
        "multimodal inputs are enabled (ModelConfig._supports_multimodal_for_mm_prefix)."
    ),
    upstream=(
        "Not needed upstream for vLLM's own models. A registration hook (e.g. a "
        "class attribute `is_mm_prefix_lm` on the model class consulted by "
        "ModelConfig) would make this patch unnecessary; not proposed yet."
    ),
    checked=("0.32.0",),
    signature="(self) -> bool",
    requires=("vllm.config.model:ModelConfig._supports_multimodal_for_mm_prefix",),
    make_replacement=_make_replacement,
)
