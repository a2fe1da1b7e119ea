"""Which implementation serves which diffusers pipeline class.

Step-wise (batchable across requests): the class the family registry
(vllm_omni_plugin/families/) declares for the pipeline's class name.
Everything else diffusers can load goes through the monolithic GenericPipeline.
See docs/diffusion.md for the reasons.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..interface import DiffusionPipelineBase


def multistage_family(architectures: Sequence[str]) -> type[DiffusionPipelineBase] | None:
    """The final-stage pipeline class (with its declaration) of a multi-stage checkpoint's names, or None.

    Args:
        architectures: config.json `architectures` or a diffusers `_class_name`.
    """
    from ...registry import stage_family

    family = stage_family(tuple(architectures))
    if family is None:
        return None
    return family.load(next(family.stages[a] for a in architectures if a in family.stages))


def stepwise_class_for(pipe: Any) -> type[DiffusionPipelineBase] | None:
    """Our step-wise class for a loaded diffusers pipeline, or None (-> generic).

    The family that declares the pipeline's class name (families/) names the class;
    that class's `variant_for(pipe)` may refine it by the loaded config.
    """
    from ...registry import pipeline_target

    found = pipeline_target(type(pipe).__name__)
    if found is None:
        return None
    family, target = found
    return family.load(target).variant_for(pipe)


def wrap(pipe: Any, model_id: str = "", force_generic: bool = False, batch_cfg: bool = True) -> DiffusionPipelineBase:
    """Wrap a loaded diffusers pipeline in its step-wise class, or the generic fallback."""
    cls = None if force_generic else stepwise_class_for(pipe)
    if cls is None:
        from .generic import GenericPipeline

        return GenericPipeline(pipe, model_id)
    return cls(pipe, model_id, batch_cfg=batch_cfg)
