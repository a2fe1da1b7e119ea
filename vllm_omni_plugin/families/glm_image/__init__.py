"""GLM-Image: an AR prior in vLLM (image tokens) feeding a DiT decoder (docs/glm_image.md)."""

from ..registry import Family, VllmModel

FAMILY = Family(
    summary="GLM-Image: AR prior (vLLM) -> DiT decoder; text-to-image and image-to-image",
    # A diffusers directory whose pipeline runs in two stages.
    stages={"GlmImagePipeline": ".pipeline:GlmImageStepwise"},
    orchestrator=".orchestrator:GlmImageOrchestrator",
    input_processor="glm_image_prior",
    stage_config="stage_config.yaml",
    vllm_models=(
        VllmModel(
            # transformers' own name (config.json of GLM-Image's vision_language_encoder/):
            # vLLM 0.32 has no such architecture, and register_models() leaves it to
            # vLLM should a later vLLM bring its own.
            architecture="GlmImageForConditionalGeneration",
            target=".vllm_model:GlmImageForConditionalGeneration",
            mm_prefix=False,
            summary="GLM-Image AR prior: prompt + target grids -> image tokens (M-RoPE on the grids)",
        ),
    ),
    checkpoints={"glm-image": ".checkpoint:build"},
    device_checkpoints=("glm-image",),
    docs="docs/glm_image.md",
)
