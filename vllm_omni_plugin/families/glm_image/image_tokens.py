"""GLM-Image's image tokens: source images -> VQ codes. Torch only (no vLLM), because two stages
need it: the AR model in vLLM (image-to-image prompts) and the DiT pipeline (the condition
images' KV cache), and the DiT stage runs without vLLM (principle 3)."""

from __future__ import annotations

import torch
from torch import nn


def image_codes(visual: nn.Module, vqmodel: nn.Module, pixel_values: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
    """Source images -> VQ codes (one [h*w] tensor per image, row-major), as transformers'
    `GlmImageModel.get_image_features` + `get_image_tokens` compute them."""
    hidden = visual(pixel_values.to(visual.dtype), grid_thw=grids, return_dict=True).pooler_output
    codes = []
    for embed, (t, h, w) in zip(torch.split(hidden, grids.prod(-1).tolist()), grids.tolist()):
        embed = embed.view(t, h, w, -1).permute(0, 3, 1, 2).reshape(-1, h, w)
        codes.append(vqmodel.encode(embed[None]).image_tokens.view(-1))
    return codes
