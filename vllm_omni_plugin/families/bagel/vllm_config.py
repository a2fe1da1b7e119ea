"""Switch vLLM's M-RoPE path on for OmniBagelForConditionalGeneration.

Why: BAGEL gives a whole image block one RoPE position (bagel_positions.py).
vLLM 0.32's only hook for per-request prompt positions is M-RoPE
(`SupportsMRoPE.get_mrope_input_positions`), and its model runner and
scheduler decide whether to use it from the HF config alone
(`ModelConfig.uses_mrope`: an `mrope_section`), at start-up, before the model
class exists. A BAGEL checkpoint's config declares no M-RoPE, and must keep
not declaring it for vLLM's own `BagelForConditionalGeneration`.

How: vLLM's per-architecture config hook, `MODELS_CONFIG_MAP[arch]
.verify_and_update_model_config(model_config)`, which `ModelConfig` runs once
after resolving the architecture. For our architecture only it adds an
`mrope_section` to the config (top level: where `uses_mrope` looks) and to
`llm_config.rope_parameters` (where vLLM's Qwen2 builds its rotary embedding,
which then is `MRotaryEmbedding`). The model feeds three identical rows, so
the rotation is exactly BAGEL's 1-D RoPE. The change lives in the config
object, which vLLM ships to the engine and worker processes; so the hook must
be registered in the process that builds the config (the plugin's
`register()`, which vLLM runs before it parses engine arguments).

MODELS_CONFIG_MAP has no public registration function: `register_config_hook`
adds our one entry, refuses to replace someone else's, and fails naming
itself if the map moved (vLLM versions checked: 0.32.0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .positions import mrope_section

if TYPE_CHECKING:
    from vllm.config import ModelConfig

ARCHITECTURE = "OmniBagelForConditionalGeneration"


def _hook_class() -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class OmniBagelConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config: "ModelConfig") -> None:
            enable_bagel_mrope(model_config.hf_config)

    return OmniBagelConfig


def enable_bagel_mrope(hf_config) -> list[int]:
    """Declare M-RoPE on a BagelConfig (idempotent); returns the section."""
    llm = hf_config.llm_config
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    rope = dict(getattr(llm, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        # Scaled RoPE variants have their own classes; M-RoPE here is only the default one.
        raise ValueError(f"{ARCHITECTURE}: BAGEL positions need default RoPE, the checkpoint has {rope.get('rope_type')!r}")
    section = mrope_section(head_dim)
    rope.setdefault("rope_theta", getattr(llm, "rope_theta", 1e6))
    rope["mrope_section"] = section
    llm.rope_parameters = rope
    hf_config.mrope_section = section
    return section


def register_config_hook() -> None:
    """Add the hook to vLLM's MODELS_CONFIG_MAP for our architecture; idempotent."""
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig  # noqa: F401
    except ImportError as e:
        import vllm

        raise RuntimeError(f"{__name__}: vllm.model_executor.models.config.MODELS_CONFIG_MAP is gone in vLLM {vllm.__version__}") from e
    current = MODELS_CONFIG_MAP.get(ARCHITECTURE)
    if current is not None:
        if current.__module__ == __name__:
            return
        raise RuntimeError(f"{__name__}: MODELS_CONFIG_MAP[{ARCHITECTURE!r}] is already {current!r}")
    MODELS_CONFIG_MAP[ARCHITECTURE] = _hook_class()
