"""Which implementation serves which diffusers pipeline class.

Step-wise (batchable across requests): the classes listed in STEPWISE.
Everything else diffusers can load goes through the monolithic GenericPipeline.
See docs/diffusion.md for the reasons.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..interface import DiffusionPipelineBase

# diffusers pipeline class name -> "module:Class" of our step-wise implementation
STEPWISE: dict[str, str] = {
    "QwenImagePipeline": "qwen_image:QwenImageStepwise",
    "QwenImageEditPipeline": "qwen_image:QwenImageEditStepwise",
    "QwenImageLayeredPipeline": "qwen_image:QwenImageLayeredStepwise",
    "WanPipeline": "wan:WanStepwise",
    "WanImageToVideoPipeline": "wan:WanImageToVideoStepwise",
}


def stepwise_class_for(pipe: Any) -> type[DiffusionPipelineBase] | None:
    """Our step-wise class for a loaded diffusers pipeline, or None (-> generic)."""
    target = STEPWISE.get(type(pipe).__name__)
    if target is None:
        return None
    # Wan2.2 TI2V-5B (`expand_timesteps`) conditions per token; served generically for now.
    if getattr(pipe.config, "expand_timesteps", False):
        return None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def wrap(pipe: Any, model_id: str = "", force_generic: bool = False, batch_cfg: bool = True) -> DiffusionPipelineBase:
    """Wrap a loaded diffusers pipeline in its step-wise class, or the generic fallback."""
    cls = None if force_generic else stepwise_class_for(pipe)
    if cls is None:
        from .generic import GenericPipeline

        return GenericPipeline(pipe, model_id)
    return cls(pipe, model_id, batch_cfg=batch_cfg)
