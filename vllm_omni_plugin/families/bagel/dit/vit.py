"""BAGEL's SigLIP NaViT image encoder + MLP connector, functional over ema.safetensors.

BAGEL stores the patch embedding as a linear layer over flattened (row, col,
channel) patches and uses learned position embeddings looked up by flattened
position id (row * vit_max_num_patch_per_side + col), no RoPE in the ViT. The
connector output gets BAGEL's frozen 2-D sin-cos `vit_pos_embed` added at the
same ids before entering the LLM (computed exactly, as vLLM's Bagel does:
`BagelModel.vit_pos_table`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import BagelModel, activation

VIT = "vit_model.vision_model"


def patchify_image(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p, p*p*3), row-major patches, channels last within a patch."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def vit_position_ids(height: int, width: int, patch: int, per_side: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(height // patch, device=device)
    cols = torch.arange(width // patch, device=device)
    return (rows[:, None] * per_side + cols[None, :]).flatten()


def vit_tokens(model: BagelModel, image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised to [-1, 1], H and W multiples of the patch -> LLM inputs (tokens, hidden)."""
    c, w = model.config, model.w
    pos = vit_position_ids(image.shape[1], image.shape[2], c.vit_patch, c.vit_per_side, model.device)
    x = F.linear(patchify_image(image.to(model.dtype), c.vit_patch), w[f"{VIT}.embeddings.patch_embedding.weight"],
                 w[f"{VIT}.embeddings.patch_embedding.bias"])
    x = x + w[f"{VIT}.embeddings.position_embedding.weight"][pos]
    heads = c.vit_heads
    for i in range(model.vit_layers):
        p = f"{VIT}.encoder.layers.{i}"
        lin = lambda name, t: F.linear(t, w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"])  # noqa: E731
        h = F.layer_norm(x, x.shape[-1:], w[f"{p}.layer_norm1.weight"], w[f"{p}.layer_norm1.bias"], c.vit_eps)
        q, k, v = (lin(f"self_attn.{n}", h).unflatten(-1, (heads, -1)).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).flatten(1)  # one image: full attention
        x = x + lin("self_attn.out_proj", attn)
        h = F.layer_norm(x, x.shape[-1:], w[f"{p}.layer_norm2.weight"], w[f"{p}.layer_norm2.bias"], c.vit_eps)
        x = x + lin("mlp.fc2", activation(c.vit_act, lin("mlp.fc1", h)))
    x = F.layer_norm(x, x.shape[-1:], w[f"{VIT}.post_layernorm.weight"], w[f"{VIT}.post_layernorm.bias"], c.vit_eps)
    x = F.linear(activation(c.connector_act, F.linear(x, w["connector.fc1.weight"], w["connector.fc1.bias"])),
                 w["connector.fc2.weight"], w["connector.fc2.bias"])
    return x + model.vit_pos_table[pos]
