"""Model classes this plugin adds to vLLM (`vllm_omni_plugin.model_registry`).

A thin view over the family registry (vllm_omni_plugin/families/): each family
declares the architectures it runs *inside vLLM's engine* (the AR stages of
multi-stage models) as `Family.vllm_models`, lazy "module:Class" strings, so
`import vllm` stays fast and no model code is imported until vLLM instantiates
the architecture. Diffusion pipelines are loaded by our own diffusion engine
from model_index.json and never go through vLLM's registry.
"""

from __future__ import annotations

from vllm_omni_plugin.registry import VllmModel, families, vllm_models

#: the same record the families declare (kept under its historical name)
OmniModel = VllmModel

OMNI_MODELS: tuple[VllmModel, ...] = vllm_models()

MM_PREFIX_ARCHITECTURES: frozenset[str] = frozenset(m.architecture for m in OMNI_MODELS if m.mm_prefix)


def register_models() -> list[str]:
    """Register every omni architecture with vLLM's ModelRegistry; idempotent."""
    from vllm import ModelRegistry

    # A family's set-up (BAGEL's per-architecture config hook) must exist where vLLM
    # builds the engine config, and register() runs before vLLM parses engine arguments.
    for family in families().values():
        if family.vllm_setup is not None:
            family.load(family.vllm_setup)()
    for model in OMNI_MODELS:
        # Re-registering the same lazy string is harmless, but skipping it keeps
        # vLLM's debug log free of "will be overwritten" lines in every process.
        if model.architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(model.architecture, model.target)
    return [m.architecture for m in OMNI_MODELS]
