"""BAGEL-7B-MoT: an AR stage in vLLM (understanding + context prefill) feeding its DiT stage (docs/bagel.md)."""

from ...registry import Family, VllmModel

FAMILY = Family(
    summary="BAGEL-7B-MoT: unified understanding (text) and generation (text2img, img2img)",
    stages={
        "BagelForConditionalGeneration": ".pipeline:BagelStepwise",
        "OmniBagelForConditionalGeneration": ".pipeline:BagelStepwise",
    },
    orchestrator=".orchestrator:BagelOrchestrator",
    input_processor="bagel_context",
    stage_config="stage_config.yaml",
    vllm_models=(
        VllmModel(
            architecture="OmniBagelForConditionalGeneration",
            target=".vllm_model:OmniBagelForConditionalGeneration",
            mm_prefix=True,
            summary="BAGEL-7B-MoT understanding/AR stage (vLLM's Bagel, extended for generation)",
        ),
    ),
    # OmniBagel's per-architecture config hook (BAGEL positions through vLLM's M-RoPE path);
    # it must exist where vLLM builds the engine config, before vLLM parses engine args.
    vllm_setup=".vllm_config:register_config_hook",
    model_types=("bagel",),
    llm_config_key="llm_config",
    checkpoints={"bagel": ".checkpoint:build"},
    device_checkpoints=("bagel",),
    docs="docs/bagel.md",
)
