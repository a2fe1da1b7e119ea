"""The FLUX AutoEncoder BAGEL uses (ae.safetensors), functional over its weights.

Layout as in FLUX's autoencoder: ResNet blocks (GroupNorm 32, swish, 3x3 convs,
1x1 `nin_shortcut` when channels change), self-attention only in the mid
block, encoder downsampling by a stride-2 conv after padding right/bottom by
one, decoder upsampling by nearest x2 then a conv. Latents are normalised as
scale * (z - shift); decode undoes that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import FLUX_SCALE_FACTOR, FLUX_SHIFT_FACTOR, BagelModel


class FluxAutoEncoder:
    def __init__(self, model: BagelModel) -> None:
        self.w = model.ae
        self.c = model.config

    def _conv(self, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        weight = self.w[f"{name}.weight"]
        return F.conv2d(x, weight, self.w[f"{name}.bias"], stride=stride, padding=weight.shape[-1] // 2 if stride == 1 else 0)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 32, self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=1e-6)

    def _resnet(self, name: str, x: torch.Tensor) -> torch.Tensor:
        h = self._conv(f"{name}.conv1", F.silu(self._norm(f"{name}.norm1", x)))
        h = self._conv(f"{name}.conv2", F.silu(self._norm(f"{name}.norm2", h)))
        if f"{name}.nin_shortcut.weight" in self.w:
            x = self._conv(f"{name}.nin_shortcut", x)
        return x + h

    def _attn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self._norm(f"{name}.norm", x)
        q, k, v = (self._conv(f"{name}.{p}", h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for p in "qkv")
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self._conv(f"{name}.proj_out", out)

    def _mid(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = self._resnet(f"{name}.block_1", x)
        x = self._attn(f"{name}.attn_1", x)
        return self._resnet(f"{name}.block_2", x)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, z, H/8, W/8): the posterior mean.

        BAGEL's AutoEncoder draws a posterior sample (mean + std * randn from the
        global RNG); the mean is that sample without the unseeded noise, so a
        request is reproducible. For a trained FLUX VAE the std is negligible.
        """
        levels = len(self.c.vae_ch_mult)
        h = self._conv("encoder.conv_in", image.to(self.w["encoder.conv_in.weight"].dtype))
        for level in range(levels):
            for j in range(self.c.vae_res_blocks):
                h = self._resnet(f"encoder.down.{level}.block.{j}", h)
            if level != levels - 1:
                h = self._conv(f"encoder.down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
        h = self._mid("encoder.mid", h)
        h = self._conv("encoder.conv_out", F.silu(self._norm("encoder.norm_out", h)))
        mean = h[:, : self.c.z_channels]
        return FLUX_SCALE_FACTOR * (mean - FLUX_SHIFT_FACTOR)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        levels = len(self.c.vae_ch_mult)
        h = z.to(self.w["decoder.conv_in.weight"].dtype) / FLUX_SCALE_FACTOR + FLUX_SHIFT_FACTOR
        h = self._conv("decoder.conv_in", h)
        h = self._mid("decoder.mid", h)
        for level in reversed(range(levels)):
            for j in range(self.c.vae_res_blocks + 1):
                h = self._resnet(f"decoder.up.{level}.block.{j}", h)
            if level != 0:
                h = self._conv(f"decoder.up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self._conv("decoder.conv_out", F.silu(self._norm("decoder.norm_out", h)))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 the way BAGEL converts: scale, clamp, truncate."""
    return ((images.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
