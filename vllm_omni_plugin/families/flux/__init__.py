"""FLUX.1 text-to-image and FLUX.1 Kontext image editing: step-wise, step-batched diffusion (docs/flux.md)."""

from ...registry import Family, Param

FAMILY = Family(
    summary="FLUX.1: guidance-distilled text-to-image (FLUX.1-dev, -schnell) and Kontext image editing",
    pipelines={
        "FluxPipeline": ".pipeline:FluxStepwise",
        "FluxKontextPipeline": ".pipeline:FluxKontextStepwise",
    },
    params={
        "true_cfg_scale": Param(
            float, "True classifier-free guidance weight (runs with a negative prompt and a weight above 1).",
            ge=0.0, le=100.0, aliases=("cfg_scale",)),
    },
    checkpoints={"flux": ".checkpoint:build", "flux-kontext": ".checkpoint:build"},
    docs="docs/flux.md",
)
