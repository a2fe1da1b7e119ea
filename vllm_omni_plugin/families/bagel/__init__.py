"""BAGEL-7B-MoT: an AR stage in vLLM (understanding + context prefill) feeding its DiT stage (docs/bagel.md)."""

from ..registry import Family, VllmModel

FAMILY = Family(
    summary="BAGEL-7B-MoT: unified understanding (text) and generation (text2img, img2img)",
    stages={
        "BagelForConditionalGeneration": "vllm_omni_plugin.diffusion.pipelines.bagel:BagelStepwise",
        "OmniBagelForConditionalGeneration": "vllm_omni_plugin.diffusion.pipelines.bagel:BagelStepwise",
    },
    orchestrator="vllm_omni_plugin.orchestrator.bagel:BagelOrchestrator",
    input_processor="bagel_context",
    vllm_models=(
        VllmModel(
            architecture="OmniBagelForConditionalGeneration",
            target="vllm_omni_plugin.models.bagel:OmniBagelForConditionalGeneration",
            mm_prefix=True,
            summary="BAGEL-7B-MoT understanding/AR stage (vLLM's Bagel, extended for generation)",
        ),
    ),
    # OmniBagel's per-architecture config hook (BAGEL positions through vLLM's M-RoPE path);
    # it must exist where vLLM builds the engine config, before vLLM parses engine args.
    vllm_setup="vllm_omni_plugin.models.bagel_config:register_config_hook",
    model_types=("bagel",),
    checkpoints={"bagel": "vllm_omni_plugin.checkpoints.bagel:build"},
    device_checkpoints=("bagel",),
    docs="docs/bagel.md",
)
