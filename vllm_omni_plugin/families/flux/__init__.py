"""FLUX.1 text-to-image and FLUX.1 Kontext image editing: step-wise, step-batched diffusion (docs/flux.md)."""

from ...registry import Family

FAMILY = Family(
    summary="FLUX.1: guidance-distilled text-to-image (FLUX.1-dev, -schnell) and Kontext image editing",
    pipelines={
        "FluxPipeline": ".pipeline:FluxStepwise",
        "FluxKontextPipeline": ".pipeline:FluxKontextStepwise",
    },
    checkpoints={"flux": ".checkpoint:build", "flux-kontext": ".checkpoint:build"},
    docs="docs/flux.md",
)
