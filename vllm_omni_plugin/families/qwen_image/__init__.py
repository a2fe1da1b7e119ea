"""Qwen-Image, -Edit, -Edit-Plus and -Layered: step-wise, step-batched diffusion (docs/diffusion.md)."""

from ...registry import Family, Param

_PIPELINE = ".pipeline"
_BUILD = ".checkpoint:build"

FAMILY = Family(
    summary="Qwen-Image: text-to-image, single/multi-image editing, RGBA layer decomposition",
    pipelines={
        "QwenImagePipeline": f"{_PIPELINE}:QwenImageStepwise",
        "QwenImageEditPipeline": f"{_PIPELINE}:QwenImageEditStepwise",
        "QwenImageEditPlusPipeline": f"{_PIPELINE}:QwenImageEditPlusStepwise",
        "QwenImageLayeredPipeline": f"{_PIPELINE}:QwenImageLayeredStepwise",
    },
    params={
        "true_cfg_scale": Param(
            float, "True classifier-free guidance weight (runs with a negative prompt and a weight above 1).",
            ge=0.0, le=100.0, aliases=("cfg_scale",)),
        # Qwen-Image-Layered
        "layers": Param(int, "RGBA layers per output (models that make layers).", ge=1),
        "resolution": Param(int, "Target resolution bucket of the output (models that size by a resolution).", ge=1),
    },
    checkpoints={
        "qwen-image": _BUILD,
        "qwen-image-edit": _BUILD,
        "qwen-image-edit-plus": _BUILD,
        "qwen-image-layered": _BUILD,
    },
    device_checkpoints=("qwen-image", "qwen-image-edit", "qwen-image-layered"),
    docs="docs/diffusion.md",
)
