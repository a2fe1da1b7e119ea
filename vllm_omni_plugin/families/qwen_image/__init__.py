"""Qwen-Image, -Edit, -Edit-Plus and -Layered: step-wise, step-batched diffusion (docs/diffusion.md)."""

from ...registry import Family

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
    checkpoints={
        "qwen-image": _BUILD,
        "qwen-image-edit": _BUILD,
        "qwen-image-edit-plus": _BUILD,
        "qwen-image-layered": _BUILD,
    },
    device_checkpoints=("qwen-image", "qwen-image-edit", "qwen-image-layered"),
    docs="docs/diffusion.md",
)
