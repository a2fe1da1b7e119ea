"""BAGEL's Qwen2 Mixture-of-Transformers decoder, functional over the checkpoint weights.

Every decoder layer holds two experts with identical shapes: the understanding
expert (`q_proj`, `mlp`, `input_layernorm`, ...) and the generation expert (the
same names with `_moe_gen`). Tokens are routed by kind, not by a learned gate:
text, ViT tokens and image-block markers use the understanding expert; VAE
latent tokens (noised ones being generated, clean ones of an img2img input)
use the generation expert. Both kinds share one attention: q/k/v come from each
token's own expert, then all tokens attend together (after per-expert q/k
RMSNorm and RoPE), and the output projection is again per expert.

Attention runs over `past` (cached, already post-norm post-RoPE context keys
and values, as in BagelContext) followed by the query tokens themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .weights import BagelModel

UND, GEN = "", "_moe_gen"  # weight-name suffix of each expert


@dataclass(frozen=True)
class Route:
    """Which query positions go through which expert (index tensors on the token axis)."""

    und: torch.Tensor | None
    gen: torch.Tensor | None

    @classmethod
    def understanding(cls) -> "Route":
        return cls(None, None)

    @classmethod
    def image_block(cls, n_latent: int, device: torch.device) -> "Route":
        """[start-of-image marker, n latent tokens, end-of-image marker]: markers are text tokens."""
        return cls(torch.tensor([0, n_latent + 1], device=device), torch.arange(1, n_latent + 1, device=device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen2RMSNorm: statistics in float32, scale applied in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2 RoPE tables for integer positions of any shape -> (*positions.shape, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, heads, d); cos/sin (B, N, d) or (N, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def _route(x: torch.Tensor, route: Route, fn: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """Apply `fn(tokens, expert_suffix)` to each expert's tokens of x (B, N, ...), reassembled in place."""
    if route.gen is None:
        return fn(x, UND)
    if route.und is None:
        return fn(x, GEN)
    a, b = fn(x[:, route.und], UND), fn(x[:, route.gen], GEN)
    out = a.new_empty(x.shape[:2] + a.shape[2:])
    out[:, route.und] = a
    out[:, route.gen] = b
    return out


def _route_many(x: torch.Tensor, route: Route, fn: Callable[[torch.Tensor, str], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """`_route` for an fn returning several tensors (each expert runs once)."""
    if route.gen is None:
        return fn(x, UND)
    if route.und is None:
        return fn(x, GEN)
    outs = []
    for a, b in zip(fn(x[:, route.und], UND), fn(x[:, route.gen], GEN)):
        out = a.new_empty(x.shape[:2] + a.shape[2:])
        out[:, route.und] = a
        out[:, route.gen] = b
        outs.append(out)
    return tuple(outs)


class MoTDecoder:
    """The BAGEL language model's decoder stack over a `BagelModel`'s weights."""

    def __init__(self, model: BagelModel) -> None:
        self.m = model
        self.c = model.config

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.m.w[f"language_model.model.layers.{layer}.{name}"]

    def _linear(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        bias = self.m.w.get(f"language_model.model.layers.{layer}.{name}.bias")
        return F.linear(x, self._w(layer, f"{name}.weight"), bias)

    def _mlp(self, layer: int, x: torch.Tensor, sfx: str) -> torch.Tensor:
        gate = self._linear(layer, f"mlp{sfx}.gate_proj", x)
        up = self._linear(layer, f"mlp{sfx}.up_proj", x)
        return self._linear(layer, f"mlp{sfx}.down_proj", F.silu(gate) * up)

    # ---- one expert's parts of layer i (also used by the vLLM AR stage's MoT routing) ----
    def input_norm(self, i: int, x: torch.Tensor, sfx: str) -> torch.Tensor:
        return rms_norm(x, self._w(i, f"input_layernorm{sfx}.weight"), self.c.rms_eps)

    def qkv(self, i: int, h: torch.Tensor, sfx: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden states (..., hidden) -> q (..., heads, d), k, v (..., kv_heads, d); q/k RMS-normed, no RoPE."""
        c, eps, d = self.c, self.c.rms_eps, self.c.head_dim
        q = rms_norm(self._linear(i, f"self_attn.q_proj{sfx}", h).unflatten(-1, (c.heads, d)), self._w(i, f"self_attn.q_norm{sfx}.weight"), eps)
        k = rms_norm(self._linear(i, f"self_attn.k_proj{sfx}", h).unflatten(-1, (c.kv_heads, d)), self._w(i, f"self_attn.k_norm{sfx}.weight"), eps)
        v = self._linear(i, f"self_attn.v_proj{sfx}", h).unflatten(-1, (c.kv_heads, d))
        return q, k, v

    def o_proj(self, i: int, attn: torch.Tensor, sfx: str) -> torch.Tensor:
        return self._linear(i, f"self_attn.o_proj{sfx}", attn)

    def mlp_block(self, i: int, x: torch.Tensor, sfx: str) -> torch.Tensor:
        """post_attention_layernorm + MLP of the residual stream x (the residual add is the caller's)."""
        return self._mlp(i, rms_norm(x, self._w(i, f"post_attention_layernorm{sfx}.weight"), self.c.rms_eps), sfx)

    def final_norm(self, x: torch.Tensor, sfx: str) -> torch.Tensor:
        return rms_norm(x, self.m.w[f"language_model.model.norm{sfx}.weight"], self.c.rms_eps)

    def forward(
        self,
        x: torch.Tensor,
        route: Route,
        positions: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run query tokens x (B, N, hidden) through every layer.

        positions: RoPE positions, (N,) or (B, N). past[i]: layer i's cached
        (K, V), each (B, T, kv_heads, head_dim). attn_mask: bool (B, 1, N, T+N),
        True = may attend; None = every query token sees everything.
        Returns the final-normed hidden states and each layer's new (K, V) of
        the query tokens (post-norm, post-RoPE: the cache layout).
        """
        c = self.c
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        new_kv = []
        for i in range(c.layers):
            h = _route(x, route, lambda t, s: self.input_norm(i, t, s))
            q, k, v = _route_many(h, route, lambda t, s: self.qkv(i, t, s))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            new_kv.append((k, v))
            keys, values = (k, v) if past is None else (torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1))
            attn = attention(q, keys, values, attn_mask)
            x = x + _route(attn, route, lambda t, s: self.o_proj(i, t, s))
            x = x + _route(x, route, lambda t, s: self.mlp_block(i, t, s))
        out = _route(x, route, lambda t, s: self.final_norm(t, s))
        return out, new_kv


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, N, heads, d), k/v (B, S, kv_heads, d) -> (B, N, heads*d). Grouped-query: kv head j serves
    the consecutive query heads j*g .. j*g+g-1 (Qwen2's repeat_kv)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
