"""Model classes this plugin adds to vLLM (`vllm_omni_plugin.model_registry`).

Entries are lazy "module:Class" strings, so `import vllm` stays fast and no
model code is imported until vLLM instantiates the architecture. Only
architectures that run *inside vLLM's engine* belong here (the AR stages of
multi-stage models); diffusion pipelines are loaded by our own diffusion
engine from model_index.json and never go through vLLM's registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OmniModel:
    architecture: str
    target: str  # "module:Class", imported lazily by vLLM
    mm_prefix: bool  # image tokens attend bidirectionally (patches/is_mm_prefix_lm.py)
    summary: str


OMNI_MODELS: tuple[OmniModel, ...] = (
    OmniModel(
        architecture="OmniBagelForConditionalGeneration",
        target="vllm_omni_plugin.models.bagel:OmniBagelForConditionalGeneration",
        mm_prefix=True,
        summary="BAGEL-7B-MoT understanding/AR stage (vLLM's Bagel, extended for generation)",
    ),
    OmniModel(
        # transformers' own name (config.json of GLM-Image's vision_language_encoder/):
        # vLLM 0.32 has no such architecture, and register_models() leaves it to
        # vLLM should a later vLLM bring its own.
        architecture="GlmImageForConditionalGeneration",
        target="vllm_omni_plugin.models.glm_image:GlmImageForConditionalGeneration",
        mm_prefix=False,
        summary="GLM-Image AR prior: prompt + target grids -> image tokens (M-RoPE on the grids)",
    ),
)

MM_PREFIX_ARCHITECTURES: frozenset[str] = frozenset(m.architecture for m in OMNI_MODELS if m.mm_prefix)


def register_models() -> list[str]:
    """Register every omni architecture with vLLM's ModelRegistry; idempotent."""
    from vllm import ModelRegistry

    from vllm_omni_plugin.models.bagel_config import register_config_hook

    # OmniBagel's per-architecture config hook (BAGEL positions through vLLM's
    # M-RoPE path); it must exist where vLLM builds the engine config, and
    # register() runs before vLLM parses engine arguments.
    register_config_hook()
    for model in OMNI_MODELS:
        # Re-registering the same lazy string is harmless, but skipping it keeps
        # vLLM's debug log free of "will be overwritten" lines in every process.
        if model.architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(model.architecture, model.target)
    return [m.architecture for m in OMNI_MODELS]
