"""The generation side of OmniBagel's AR stage: img2img VAE blocks through the MoT generation expert.

An img2img prompt carries the image to edit as a `vae_image` block
[<|vision_start|>, latent tokens (<|vision_pad|> rows), <|vision_end|>]
(bagel_processing.py). Its latent rows are embedded as BAGEL does
(`vae2llm(patchify(VAE.encode(image))) + time_embedder(t=0) +
latent_pos_embed[ids]`) and go through the GENERATION expert of every decoder
layer (`*_moe_gen` weights); the markers and every other token keep the
understanding expert. Both kinds share one attention call per layer, so their
K/V land in vLLM's paged cache side by side, which is what the KV connector
hands to the diffusion stage.

No math is duplicated here: the FLUX encoder, the latent embedding and the
generation expert's per-layer parts are the diffusion stage's
(`dit.autoencoder`, `dit.weights.BagelModel`, `dit.mot.MoTDecoder`),
run over the checkpoint tensors the vLLM loader streams (kept under their
checkpoint names, outside the nn.Module tree: vLLM's own modules do not hold
them). The understanding rows use vLLM's modules of each layer.

A batch without generation rows (every decode step, every text / img2text
prefill) never comes here: the model takes vLLM's unchanged forward.
"""

from __future__ import annotations

import torch

from vllm_omni_plugin.families.bagel.dit.autoencoder import FluxAutoEncoder
from vllm_omni_plugin.families.bagel.dit.mot import GEN, MoTDecoder
from vllm_omni_plugin.families.bagel.dit.weights import BagelConfig, BagelModel

# Checkpoint tensors the generation side needs (vLLM's Bagel drops them all).
_EMA_KEYS = ("moe_gen", "vae2llm", "time_embedder", "latent_pos_embed")
_AE_PREFIX = "encoder."  # the FLUX encoder in ae.safetensors (its decoder stays with the DiT stage)


def is_generation_weight(name: str) -> bool:
    return name.startswith(_AE_PREFIX) or any(k in name for k in _EMA_KEYS)


class BagelGenerationSide:
    """Generation-side weights of one BAGEL checkpoint, as a `BagelModel` view, plus its math."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device) -> None:
        self.config = BagelConfig.from_json(hf_config.to_dict())
        self.dtype, self.device = dtype, device
        self._ema: dict[str, torch.Tensor] = {}
        self._ae: dict[str, torch.Tensor] = {}
        self._model: BagelModel | None = None

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name.startswith(_AE_PREFIX):  # the AE runs float32 on CPU, as the diffusion stage's loader does
            self._ae[name] = tensor.to(self.device, self.dtype if self.device.type == "cuda" else torch.float32)
        else:
            self._ema[name] = tensor.to(self.device, self.dtype)
        self._model = None

    @property
    def model(self) -> BagelModel:
        if self._model is None:
            self._model = BagelModel("", self.config, self._ema, self._ae, self.dtype, self.device)
        return self._model

    @property
    def loaded(self) -> bool:
        return bool(self._ema) and bool(self._ae)

    # ---- embeddings ---------------------------------------------------------------
    @torch.no_grad()
    def latent_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in [-1, 1] -> the VAE block's inner LLM inputs (H/16 * W/16, hidden) at flow time 0."""
        m = self.model
        pixels = pixels.to(self.device)
        latents = FluxAutoEncoder(m).encode(pixels[None])[0].to(self.dtype)
        tokens = m.patchify(latents)
        pos = m.latent_position_ids(pixels.shape[1], pixels.shape[2])
        t0 = torch.zeros(1, device=self.device)  # a clean image: flow time 0
        return m.latent_embed(tokens[None], t0, pos)[0]

    # ---- MoT forward ----------------------------------------------------------------
    def forward(self, language_model, positions: torch.Tensor, x: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """vLLM's Qwen2Model layers with MoT routing: rows where `gen` is True use the generation expert.

        x: input embeddings (tokens, hidden). Same attention call per layer as
        vLLM's own layers (the paged KV cache, this step's attention metadata).
        """
        dec = MoTDecoder(self.model)
        und = ~gen
        for i, layer in enumerate(language_model.layers):
            attn = layer.self_attn
            h_und = layer.input_layernorm(x[und])
            q_u, k_u, v_u = attn.qkv_proj(h_und)[0].split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            if attn.qk_norm:
                n = q_u.shape[0]
                q_u = attn.q_norm(q_u.view(n, attn.num_heads, attn.head_dim)).view(n, attn.q_size)
                k_u = attn.k_norm(k_u.view(n, attn.num_kv_heads, attn.head_dim)).view(n, attn.kv_size)
            q_g, k_g, v_g = (t.flatten(-2) for t in dec.qkv(i, dec.input_norm(i, x[gen], GEN), GEN))
            q = _merge(und, q_u, gen, q_g)
            k = _merge(und, k_u, gen, k_g)
            v = _merge(und, v_u, gen, v_g)
            q, k = attn.rotary_emb(positions, q, k)
            o = attn.attn(q, k, v)
            x = x + _merge(und, attn.o_proj(o[und])[0], gen, dec.o_proj(i, o[gen], GEN))
            x = x + _merge(und, layer.mlp(layer.post_attention_layernorm(x[und])), gen, dec.mlp_block(i, x[gen], GEN))
        return _merge(und, language_model.norm(x[und]), gen, dec.final_norm(x[gen], GEN))


def _merge(mask_a: torch.Tensor, a: torch.Tensor, mask_b: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a.new_empty((mask_a.shape[0],) + a.shape[1:])
    out[mask_a] = a
    out[mask_b] = b.to(a.dtype)
    return out
