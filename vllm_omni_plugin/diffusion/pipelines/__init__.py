"""Which implementation serves which diffusers pipeline class.

Step-wise (batchable across requests): the classes listed in STEPWISE.
Everything else diffusers can load goes through the monolithic GenericPipeline.
See docs/diffusion.md for the reasons.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

from ..interface import DiffusionPipelineBase

# diffusers pipeline class name -> "module:Class" of our step-wise implementation
STEPWISE: dict[str, str] = {
    "QwenImagePipeline": "qwen_image:QwenImageStepwise",
    "QwenImageEditPipeline": "qwen_image:QwenImageEditStepwise",
    "QwenImageEditPlusPipeline": "qwen_image:QwenImageEditPlusStepwise",
    "QwenImageLayeredPipeline": "qwen_image:QwenImageLayeredStepwise",
    "WanPipeline": "wan:WanStepwise",
    "WanImageToVideoPipeline": "wan:WanImageToVideoStepwise",
    # WanPipeline with expand_timesteps (Wan2.2 TI2V-5B) -> wan:WanTI2VStepwise, see stepwise_class_for
}


# Architectures of multi-stage checkpoints (config.json) -> "module:Class" of the
# family whose diffusion stage they carry; its `capabilities.orchestrator` names
# the orchestrator that runs the whole model.
MULTISTAGE: dict[str, str] = {
    "BagelForConditionalGeneration": "bagel:BagelStepwise",
    "OmniBagelForConditionalGeneration": "bagel:BagelStepwise",
    # GLM-Image: a diffusers directory whose pipeline a shipped stage config runs in two stages
    "GlmImagePipeline": "glm_image:GlmImageStepwise",
}


def _load_class(target: str) -> type[DiffusionPipelineBase]:
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def multistage_family(architectures: Sequence[str]) -> type[DiffusionPipelineBase] | None:
    """The pipeline class (with its declaration) of a multi-stage checkpoint's architectures, or None."""
    for arch in architectures:
        if arch in MULTISTAGE:
            return _load_class(MULTISTAGE[arch])
    return None


def stepwise_class_for(pipe: Any) -> type[DiffusionPipelineBase] | None:
    """Our step-wise class for a loaded diffusers pipeline, or None (-> generic)."""
    target = STEPWISE.get(type(pipe).__name__)
    if target is None:
        return None
    # Wan2.2 TI2V-5B (`expand_timesteps`): per-token timesteps, text- and image-to-video in one
    # checkpoint (its model_index names WanPipeline); the I2V class with it stays generic.
    if getattr(pipe.config, "expand_timesteps", False):
        if type(pipe).__name__ != "WanPipeline":
            return None
        target = "wan:WanTI2VStepwise"
    return _load_class(target)


def wrap(pipe: Any, model_id: str = "", force_generic: bool = False, batch_cfg: bool = True) -> DiffusionPipelineBase:
    """Wrap a loaded diffusers pipeline in its step-wise class, or the generic fallback."""
    cls = None if force_generic else stepwise_class_for(pipe)
    if cls is None:
        from .generic import GenericPipeline

        return GenericPipeline(pipe, model_id)
    return cls(pipe, model_id, batch_cfg=batch_cfg)
