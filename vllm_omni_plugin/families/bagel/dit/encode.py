"""encode_context(): BAGEL's prefill of the generation context, without vLLM.

What ByteDance's inferencer does before generating (checked against
ByteDance-Seed/Bagel bagel.py / inferencer.py):

  text block    [<|im_start|>] + prompt tokens + [<|im_end|>], understanding
                expert, causal, RoPE positions r, r+1, ...; r advances by its length
  VAE block     [<|vision_start|>] + the input image's VAE latent tokens +
                [<|vision_end|>], all at ONE RoPE position r (r advances by 1);
                latent tokens use the GENERATION expert (vae2llm + time
                embedding of t=0 + latent_pos_embed), markers the understanding
                expert; attention is full within the block
  ViT block     [<|vision_start|>] + ViT tokens + [<|vision_end|>], understanding
                expert, one RoPE position, full attention within the block

  text2img:  cond = text @0..;  cfg_text = empty context (latents at position 0)
  img2img:   cond = VAE @0, ViT @1, text @2..;  cfg_text = VAE @0, ViT @1;
             cfg_img = text @0..

A negative prompt (not in ByteDance's code; how an AR engine that cannot
prefill zero tokens provides the text-free branch) is appended as a text block
to the cfg_text context.

ViT input size: the image is resized to the ViT's square image_size, as the
checkpoint's preprocessor_config.json (and so the vLLM AR stage) does;
ByteDance's own transform keeps the aspect ratio (224..980 px, stride 14).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ....diffusion.capabilities import InvalidParams
from .context import BagelContext, BranchKV
from .mot import MoTDecoder, Route
from .vit import vit_tokens
from .weights import BagelConfig, BagelModel, BagelText

BOS, EOS, SOI, EOI = "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"


def default_size(config: BagelConfig, image: Any | None) -> tuple[int, int]:
    """(height, width) BAGEL generates when the request gives none.

    text2img: the largest square the latent position table covers (1024 for
    BAGEL-7B-MoT, its default). img2img: the input image's size, scaled down to
    fit that table and floored to multiples of the latent downsample (16).
    """
    side, d = config.max_image_side, config.latent_downsample
    if image is None:
        return side, side
    width, height = image.size
    scale = min(1.0, side / max(width, height))
    return max(d, int(height * scale) // d * d), max(d, int(width * scale) // d * d)


def check_size(config: BagelConfig, height: int, width: int) -> None:
    d, side = config.latent_downsample, config.max_image_side
    if height % d or width % d or not (d <= height <= side and d <= width <= side):
        raise InvalidParams(f"BAGEL generates sizes that are multiples of {d} between {d} and {side} px; "
                            f"got {height}x{width}", "size")


def image_pixels(image: Any, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL image -> (3, height, width) in [-1, 1] (bicubic resize when the size differs)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr * 2.0 - 1.0).to(device)


class _Prefill:
    """Appends blocks to one branch's KV cache, tracking BAGEL's RoPE position."""

    def __init__(self, model: BagelModel, decoder: MoTDecoder) -> None:
        self.m, self.dec = model, decoder
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rope = 0

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[1]

    def _run(self, x: torch.Tensor, route: Route, positions: torch.Tensor, causal: bool) -> None:
        n, t = x.shape[0], self.length
        mask = torch.ones(n, t + n, dtype=torch.bool, device=x.device)
        if causal:
            mask[:, t:] = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        _, new = self.dec.forward(x[None], route, positions, self.kv, mask[None, None])
        self.kv = new if self.kv is None else [(torch.cat([k0, k], 1), torch.cat([v0, v], 1)) for (k0, v0), (k, v) in zip(self.kv, new)]

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.m.device)

    def text(self, text: str) -> None:
        ids = text_block_ids(self.m, text)
        positions = torch.arange(self.rope, self.rope + len(ids), device=self.m.device)
        self._run(self.m.embed_tokens(self._ids(ids)), Route.understanding(), positions, causal=True)
        self.rope += len(ids)

    def _image_block(self, inner: torch.Tensor, route: Route) -> None:
        markers = self.m.embed_tokens(self._ids([self.m.token_id(SOI), self.m.token_id(EOI)]))
        x = torch.cat([markers[:1], inner, markers[1:]])
        self._run(x, route, torch.full((x.shape[0],), self.rope, device=self.m.device), causal=False)
        self.rope += 1

    def vae_image(self, pixels: torch.Tensor, latents: torch.Tensor) -> None:
        tokens = self.m.patchify(latents)
        pos = self.m.latent_position_ids(pixels.shape[1], pixels.shape[2])
        t0 = torch.zeros(1, device=self.m.device)  # clean image: flow time 0
        inner = self.m.latent_embed(tokens[None], t0, pos)[0]
        self._image_block(inner, Route.vae_block())

    def vit_image(self, pixels: torch.Tensor) -> None:
        self._image_block(vit_tokens(self.m, pixels), Route.understanding())

    def copy(self) -> "_Prefill":
        other = _Prefill(self.m, self.dec)
        other.kv, other.rope = (None if self.kv is None else list(self.kv)), self.rope
        return other

    def branch(self) -> BranchKV:
        if self.kv is None:
            return empty_branch(self.m.config, self.m.dtype, self.m.device)
        return BranchKV(tuple(k[0] for k, _ in self.kv), tuple(v[0] for _, v in self.kv), self.rope)


def empty_branch(config: BagelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> BranchKV:
    """A context of zero tokens (BAGEL's text2img text-CFG branch); latents at position 0.

    Args:
        config: the checkpoint's BagelConfig (layers, KV heads, head dim).
        dtype, device: of the (empty) tensors; the DiT stage moves branches to its own.
    """
    empty = torch.empty(0, config.kv_heads, config.head_dim, dtype=dtype, device=device)
    return BranchKV((empty,) * config.layers, (empty,) * config.layers, 0)


def text_block_ids(text_side: BagelText | BagelModel, text: str) -> list[int]:
    """A text block's token ids: [<|im_start|>] + text + [<|im_end|>] (also the AR stage's prompt).

    Args:
        text_side: the checkpoint's BagelText (or a BagelModel, which has one).
        text: the block's text.
    """
    ids = text_side.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [text_side.token_id(BOS), *ids, text_side.token_id(EOS)]


@torch.no_grad()
def encode_context(
    model: BagelModel,
    request_id: str,
    prompt: str,
    image: Any | None = None,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> BagelContext:
    """Prefill the cond / cfg_text (/ cfg_img) contexts of one request with the understanding side."""
    from .autoencoder import FluxAutoEncoder

    c = model.config
    if height is None or width is None:
        height, width = default_size(c, image)
    check_size(c, height, width)
    decoder = MoTDecoder(model)
    cond = _Prefill(model, decoder)
    cfg_img = None
    if image is not None:
        # img2img: the output has the input's size in BAGEL, so the VAE sees the image at (height, width).
        pixels = image_pixels(image, height, width, model.device)
        latents = FluxAutoEncoder(model).encode(pixels[None])[0].to(model.dtype)
        cond.vae_image(pixels, latents)
        cond.vit_image(image_pixels(image, c.vit_image_size, c.vit_image_size, model.device))
        cfg_img = _Prefill(model, decoder)
        cfg_img.text(prompt)
    cfg_text = cond.copy()
    if negative_prompt is not None:
        cfg_text.text(negative_prompt)
    cond.text(prompt)
    return BagelContext(
        request_id=request_id,
        cond=cond.branch(),
        cfg_text=cfg_text.branch(),
        cfg_img=None if cfg_img is None else cfg_img.branch(),
        height=height,
        width=width,
    )

