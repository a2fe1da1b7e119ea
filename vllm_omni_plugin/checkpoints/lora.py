"""Tiny seeded LoRA adapters for a loaded diffusers pipeline (tests, benchmarks, docs examples).

peft injects the adapter into a copy of the pipeline's LoRA component (the class's
`transformer_name`), `get_peft_model_state_dict` takes its weights and the pipeline
class's own `save_lora_weights` writes them, as a diffusers user saves a trained LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

#: attention projections every diffusers DiT of the served families has
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def make_lora(
    pipe: Any,
    out_dir: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    magnitude: float = 0.05,
    metadata: bool = True,
) -> Path:
    """Write a random LoRA for `pipe`'s transformer to `out_dir`; returns the safetensors file.

    Args:
        rank, alpha: the adapter's r and lora_alpha (alpha None: = rank, scaling 1).
        targets: peft `target_modules`.
        magnitude: std of the random A and B entries (peft's own init makes B zero: no effect).
        metadata: write the LoraConfig into the file (diffusers' `lora_adapter_metadata`);
            False: diffusers infers rank from the shapes and alpha = rank.
    """
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cls = type(pipe)
    model = getattr(pipe, cls.transformer_name)
    # Only the adapter's key names and shapes are needed: a weightless (meta) twin of the transformer,
    # not a copy (a full Qwen-Image DiT is 40 GB in bf16).
    with torch.device("meta"):
        component = type(model).from_config(model.config)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                        init_lora_weights=False)
    inject_adapter_in_model(config, component)
    gen = torch.Generator("cpu").manual_seed(seed)
    state = get_peft_model_state_dict(component)
    state = {k: (torch.randn(v.shape, generator=gen) * magnitude).to(model.dtype) for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = None
    if metadata:
        meta = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "target_modules", "use_rslora",
                                                                    "use_dora", "lora_bias")}
        meta["target_modules"] = sorted(meta["target_modules"])
    cls.save_lora_weights(out_dir, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    return out_dir / "pytorch_lora_weights.safetensors"
