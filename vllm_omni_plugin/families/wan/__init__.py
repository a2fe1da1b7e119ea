"""Wan2.2 T2V / I2V (A14B, two experts) and TI2V-5B: step-wise video diffusion (docs/diffusion.md)."""

from ...registry import Family, Param

_PIPELINE = ".pipeline"
_BUILD = ".checkpoint:build"

FAMILY = Family(
    summary="Wan2.2: text-to-video, image-to-video, and TI2V-5B (both in one checkpoint)",
    # WanPipeline with `expand_timesteps` (TI2V-5B) is picked by WanStepwise.variant_for.
    pipelines={
        "WanPipeline": f"{_PIPELINE}:WanStepwise",
        "WanImageToVideoPipeline": f"{_PIPELINE}:WanImageToVideoStepwise",
    },
    params={
        # Wan2.2 A14B: when unset it follows the resolved guidance_scale (WanStepwise's derive)
        "guidance_scale_2": Param(
            float, "Guidance weight of the low-noise expert (models with two experts).", ge=0.0, le=100.0),
    },
    checkpoints={"wan2.2-t2v": _BUILD, "wan2.2-i2v": _BUILD, "wan2.2-ti2v-5b": _BUILD},
    docs="docs/diffusion.md",
)
