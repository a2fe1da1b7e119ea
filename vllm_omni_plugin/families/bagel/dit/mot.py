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
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .attention import PackedContext, attention, attention_per_row
from .weights import BagelModel

UND, GEN = "", "_moe_gen"  # weight-name suffix of each expert


@dataclass(frozen=True)
class Route:
    """Which query tokens go through which expert.

    image_block False: every token is understanding (text, ViT blocks).
    image_block True: the query is [start-of-image marker, latent tokens, end-of-image
    marker]; the markers are text tokens (understanding), the latents generation.
    The split is by slicing, never by index tensors: nothing data-dependent, and no
    extra tensor shapes for torch.compile to guard on.
    """

    image_block: bool = False

    @classmethod
    def understanding(cls) -> "Route":
        return cls(False)

    @classmethod
    def vae_block(cls) -> "Route":
        """[start-of-image marker, VAE latent tokens, end-of-image marker]."""
        return cls(True)


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


class MoTDecoder:
    """The BAGEL language model's decoder stack over a `BagelModel`'s weights.

    A layer is two token-wise regions around the attention: `pre_attention`
    (input norm, q/k/v, q/k norms, RoPE) and `post_attention` (o_proj, residual,
    MLP, residual), each a pure function of one expert's weights (`expert_weights`)
    over flattened tokens (tokens, hidden). The experts' tokens are kept apart in
    the residual stream; only the attention sees them joined, per row.
    `compile_layers()` swaps in torch.compile'd copies of the two regions that
    every layer and both experts share (regional compilation: they differ only in
    their weight tensors, which are arguments, and in the token count, a dynamic
    size that is never 1 here: the markers are 2 per row, so the row count -- 1
    when CFG is off for one request -- is not a size the graph sees).
    """

    def __init__(self, model: BagelModel) -> None:
        self.m = model
        self.c = model.config
        self.pre_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = pre_attention
        self.post_fn: Callable[..., torch.Tensor] = post_attention
        self._experts: dict[tuple[int, str], dict[str, torch.Tensor | None]] = {}

    def compile_layers(self, **compile_kwargs) -> None:
        """Regional torch.compile of the decoder layer's two token-wise regions, shared by all layers."""
        options = {"fullgraph": True, "dynamic": True, **compile_kwargs}
        self.pre_fn = torch.compile(pre_attention, **options)
        self.post_fn = torch.compile(post_attention, **options)

    @property
    def compiled(self) -> bool:
        return self.pre_fn is not pre_attention

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.m.w[f"language_model.model.layers.{layer}.{name}"]

    def expert_weights(self, i: int, sfx: str) -> dict[str, torch.Tensor | None]:
        """Layer i's weights of one expert (suffix UND or GEN) under expert-neutral names."""
        key = (i, sfx)
        if key not in self._experts:
            p, get = f"language_model.model.layers.{i}.", self.m.w.get
            w: dict[str, torch.Tensor | None] = {
                "input_norm": get(f"{p}input_layernorm{sfx}.weight"),
                "post_norm": get(f"{p}post_attention_layernorm{sfx}.weight"),
                "q_norm": get(f"{p}self_attn.q_norm{sfx}.weight"),
                "k_norm": get(f"{p}self_attn.k_norm{sfx}.weight"),
            }
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w[proj], w[f"{proj}.bias"] = get(f"{p}self_attn.{proj}{sfx}.weight"), get(f"{p}self_attn.{proj}{sfx}.bias")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w[proj], w[f"{proj}.bias"] = get(f"{p}mlp{sfx}.{proj}.weight"), get(f"{p}mlp{sfx}.{proj}.bias")
            self._experts[key] = w
        return self._experts[key]

    # ---- one expert's parts of layer i (also used by the vLLM AR stage's MoT routing) ----
    def input_norm(self, i: int, x: torch.Tensor, sfx: str) -> torch.Tensor:
        return rms_norm(x, self.expert_weights(i, sfx)["input_norm"], self.c.rms_eps)

    def qkv(self, i: int, h: torch.Tensor, sfx: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden states (..., hidden) -> q (..., heads, d), k, v (..., kv_heads, d); q/k RMS-normed, no RoPE."""
        c = self.c
        return _qkv(self.expert_weights(i, sfx), h, c.rms_eps, c.heads, c.kv_heads, c.head_dim)

    def o_proj(self, i: int, attn: torch.Tensor, sfx: str) -> torch.Tensor:
        return _linear(self.expert_weights(i, sfx), "o_proj", attn)

    def mlp_block(self, i: int, x: torch.Tensor, sfx: str) -> torch.Tensor:
        """post_attention_layernorm + MLP of the residual stream x (the residual add is the caller's)."""
        return _mlp_block(self.expert_weights(i, sfx), x, self.c.rms_eps)

    def final_norm(self, x: torch.Tensor, sfx: str) -> torch.Tensor:
        return rms_norm(x, self.m.w[f"language_model.model.norm{sfx}.weight"], self.c.rms_eps)

    def forward(
        self,
        x: torch.Tensor,
        route: Route,
        positions: torch.Tensor,
        past: list[Any] | PackedContext | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run query tokens x (B, N, hidden) through every layer.

        positions: RoPE positions, (N,) or (B, N). past[i]: layer i's cached
        context, either (K, V) each (B, T, kv_heads, head_dim) -- rows padded to
        one length, attn_mask hiding the padding -- or a list of B per-row
        (K_r, V_r), each (T_r, kv_heads, head_dim): one attention per row over
        its own context, no padding (`attention_per_row`) -- or one `PackedContext` for all
        layers: the rows packed back to back, a variable-length kernel. attn_mask: bool
        (B, 1, N, T+N), True = may attend; None = every query token sees everything.
        Returns the final-normed hidden states and each layer's new (K, V) of
        the query tokens (post-norm, post-RoPE: the cache layout).
        """
        c = self.c
        b, n = x.shape[:2]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        cos, sin = cos.expand(b, n, -1), sin.expand(b, n, -1)
        experts = (UND, GEN) if route.image_block else (UND,)
        split = _split_block if route.image_block else (lambda t: (t,))
        join = _join_block if route.image_block else (lambda parts: parts[0])

        def flat(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, N, ...) -> each expert's (tokens, ...)
            return tuple(p.reshape(-1, *p.shape[2:]) for p in split(t))

        def rows(parts: list[torch.Tensor]) -> torch.Tensor:  # each expert's (tokens, ...) -> (B, N, ...)
            return join([p.view(b, -1, *p.shape[1:]) for p in parts])

        xs, coss, sins = list(flat(x)), flat(cos), flat(sin)
        new_kv = []
        for i in range(c.layers):
            qkv = [self.pre_fn(self.expert_weights(i, e), xe, ce, se, c.rms_eps, c.heads, c.kv_heads, c.head_dim)
                   for e, xe, ce, se in zip(experts, xs, coss, sins)]
            q, k, v = (rows([t[j] for t in qkv]) for j in range(3))
            new_kv.append((k, v))
            if past is None:
                attn = attention(q, k, v, attn_mask)
            elif isinstance(past, PackedContext):
                attn = past.attend(i, q, k, v)
            elif isinstance(past[i], list):
                attn = attention_per_row(q, k, v, past[i])
            else:
                attn = attention(q, torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1), attn_mask)
            attn = flat(attn)
            xs = [self.post_fn(self.expert_weights(i, e), xe, ae, c.rms_eps) for e, xe, ae in zip(experts, xs, attn)]
        out = rows([self.final_norm(xe, e) for e, xe in zip(experts, xs)])
        return out, new_kv


def _split_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An image block's tokens (B, N, ...) -> (the two markers (B, 2, ...), the latents (B, N-2, ...))."""
    return torch.cat([x[:, :1], x[:, -1:]], dim=1), x[:, 1:-1]


def _join_block(parts: list[torch.Tensor]) -> torch.Tensor:
    markers, latents = parts
    return torch.cat([markers[:, :1], latents, markers[:, 1:]], dim=1)


def _linear(w: Mapping[str, torch.Tensor | None], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[name], w[f"{name}.bias"])


def _qkv(w: Mapping[str, torch.Tensor | None], h: torch.Tensor, eps: float, heads: int, kv_heads: int,
         d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = rms_norm(_linear(w, "q_proj", h).unflatten(-1, (heads, d)), w["q_norm"], eps)
    k = rms_norm(_linear(w, "k_proj", h).unflatten(-1, (kv_heads, d)), w["k_norm"], eps)
    v = _linear(w, "v_proj", h).unflatten(-1, (kv_heads, d))
    return q, k, v


def _mlp_block(w: Mapping[str, torch.Tensor | None], x: torch.Tensor, eps: float) -> torch.Tensor:
    h = rms_norm(x, w["post_norm"], eps)
    return _linear(w, "down_proj", F.silu(_linear(w, "gate_proj", h)) * _linear(w, "up_proj", h))


def pre_attention(w: Mapping[str, torch.Tensor | None], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's tokens x (M, hidden), RoPE tables (M, d) -> q (M, heads, d), k, v (M, kv_heads, d), post-RoPE."""
    q, k, v = _qkv(w, rms_norm(x, w["input_norm"], eps), eps, heads, kv_heads, head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def post_attention(w: Mapping[str, torch.Tensor | None], x: torch.Tensor, attn: torch.Tensor, eps: float) -> torch.Tensor:
    """One expert's residual stream x (M, hidden) and attention output (M, heads*d) -> the layer's output."""
    x = x + _linear(w, "o_proj", attn)
    return x + _mlp_block(w, x, eps)
