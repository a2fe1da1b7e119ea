"""BAGEL generation (the DiT side of BAGEL-7B-MoT), in plain PyTorch.

    context.py      BagelContext: the prefilled context KV of each CFG branch plus
                    keyed metadata -- what the AR stage's KV connector hands over
    weights.py      reads config.json / ema.safetensors / ae.safetensors
    mot.py          the Qwen2 Mixture-of-Transformers layers (understanding and
                    generation experts), attention over cached context KV
    autoencoder.py  the FLUX AutoEncoder (encode for img2img, decode)
    vit.py          the SigLIP NaViT + connector (img2img context)
    encode.py       encode_context(): builds a BagelContext without vLLM

The step-wise stage itself is `..pipeline.BagelStepwise`. No vLLM here
(ARCHITECTURE.md, principle 3).
"""

from .context import BagelContext, BranchKV
from .encode import encode_context
from .weights import BagelConfig, BagelModel, BagelText, is_bagel_checkpoint, load_bagel_model, read_bagel_config

__all__ = [
    "BagelConfig",
    "BagelContext",
    "BagelModel",
    "BagelText",
    "BranchKV",
    "encode_context",
    "is_bagel_checkpoint",
    "load_bagel_model",
    "read_bagel_config",
]
