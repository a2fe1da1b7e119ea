"""Model families: one sub-package per family, found by the registry (registry.py).

    <family>/__init__.py   FAMILY = Family(...): names and lazy "module:attr" targets only
    <family>/...           its vLLM model classes, step-wise pipeline, stage hand-over,
                           checkpoint factory, stage YAML (docs/families.md)

`families()`, `family(name)` and `identify(checkpoint_dir)` are the questions
the generic layers ask; none of them imports a family's code.
"""

from .registry import (
    CheckpointInfo,
    Family,
    VllmModel,
    checkpoint_builders,
    families,
    family,
    identify,
    input_processors,
    pipeline_target,
    stage_family,
    vllm_models,
)

__all__ = [
    "CheckpointInfo",
    "Family",
    "VllmModel",
    "checkpoint_builders",
    "families",
    "family",
    "identify",
    "input_processors",
    "pipeline_target",
    "stage_family",
    "vllm_models",
]
