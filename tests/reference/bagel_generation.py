"""Independent plain-PyTorch reference of BAGEL image generation (test oracle).

Written from ByteDance-Seed/Bagel's description of the model, sharing NO code
with vllm_omni_plugin.families.bagel.dit: it runs the whole MoT over one sequence
per CFG branch -- context tokens AND the image block being generated -- every
step, with a block attention mask, and no KV cache, no transfer, no vLLM.

  * both experts are evaluated on every token and the right one is selected by
    a per-token mask (the stage instead gathers each expert's tokens);
  * attention is an explicit softmax(QK^T / sqrt(d) + mask) V;
  * the FLUX AE is diffusers' AutoencoderKL (weights converted from the FLUX
    layout by diffusers' own converter); the ViT is transformers'
    SiglipVisionModel (the patch linear turned back into its conv).

Sequence of a branch = its context blocks, then the generated image block:
  text block   <|im_start|> text <|im_end|>, understanding expert, causal,
               consecutive RoPE positions
  VAE block    <|vision_start|> clean latents <|vision_end|>: latents through
               the generation expert (vae2llm + time_embed(0) + latent_pos_embed),
               one RoPE position, full attention inside the block
  ViT block    <|vision_start|> ViT tokens (+ the exact 2-D sin-cos vit_pos_embed)
               <|vision_end|>, understanding, one position
  image block  <|vision_start|> noised latents <|vision_end|>, like the VAE block
               at flow time t; the block after the context's last position
A token sees every earlier block, and inside its own block everything
(image blocks) or what precedes it (text).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from reference.bagel_understanding import sincos_2d  # the frozen table, computed exactly (no plugin code)

SCALE, SHIFT = 0.3611, 0.1159  # FLUX AE latent normalisation
LM = "language_model.model"


@dataclass
class Block:
    embeds: torch.Tensor  # (n, hidden)
    gen: torch.Tensor  # (n,) bool: generation-expert token
    causal: bool
    advance: int  # RoPE positions the block consumes (text: its length; image: 1)


class BagelReference:
    """`device`: where it runs. Weights stay in the checkpoint's dtype there and are
    upcast to float32 at every use (exact: bf16 -> f32), so the math is float32
    on any checkpoint while a full-size one takes half the memory."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer

        self.device = torch.device(device)
        self.path = Path(path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.cfg = cfg
        llm = cfg["llm_config"]
        self.hidden, self.heads, self.kv_heads = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
        self.layers, self.eps, self.theta = llm["num_hidden_layers"], llm["rms_norm_eps"], llm["rope_theta"]
        self.hd = self.hidden // self.heads
        self.p = cfg["latent_patch_size"]
        self.z = cfg["vae_config"]["z_channels"]
        self.down = cfg["vae_config"]["downsample"] * self.p
        self.max_latent = cfg["max_latent_size"]
        self.w = load_file(str(self.path / "ema.safetensors"), device=str(self.device))
        self.tok = AutoTokenizer.from_pretrained(str(self.path))
        self.vae = self._load_vae(cfg["vae_config"])
        self.vit = self._load_vit(cfg["vit_config"])

    # ---- components from diffusers / transformers --------------------------------
    def _load_vae(self, vae_cfg: dict):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        ch, mult = vae_cfg.get("ch", 128), vae_cfg.get("ch_mult", [1, 2, 4, 4])
        config = dict(
            in_channels=3, out_channels=3, latent_channels=self.z,
            down_block_types=["DownEncoderBlock2D"] * len(mult), up_block_types=["UpDecoderBlock2D"] * len(mult),
            block_out_channels=[ch * m for m in mult], layers_per_block=vae_cfg.get("num_res_blocks", 2),
            norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=SCALE, shift_factor=SHIFT,
        )
        vae = AutoencoderKL(**config)
        state = convert_ldm_vae_checkpoint(load_file(str(self.path / "ae.safetensors")), config)
        vae.load_state_dict(state, strict=True)
        return vae.eval().float().to(self.device)

    def _load_vit(self, vit_cfg: dict):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        prefix = "vit_model."
        layers = len({k.split(".")[4] for k in self.w if k.startswith(prefix + "vision_model.encoder.layers.")})
        config = SiglipVisionConfig(**{**vit_cfg, "num_hidden_layers": layers, "vision_use_head": False})
        vit = SiglipVisionModel(config).eval().float().to(self.device)
        # transformers 5 names the SiglipVisionModel parameters without "vision_model."
        own = set(vit.state_dict())
        strip = prefix if "vision_model.post_layernorm.weight" in own else prefix + "vision_model."
        state = {k[len(strip):]: v for k, v in self.w.items() if k.startswith(strip)}
        pe = next(k for k in state if k.endswith("embeddings.patch_embedding.weight"))
        p = vit_cfg["patch_size"]
        # BAGEL stores the patch conv as a linear over (row, col, channel) patches.
        state[pe] = state[pe].reshape(-1, p, p, 3).permute(0, 3, 1, 2).contiguous()
        vit.load_state_dict(state, strict=True)
        return vit

    # ---- small pieces ------------------------------------------------------------
    def tid(self, token: str) -> int:
        return self.tok.convert_tokens_to_ids(token)

    def W(self, name: str) -> torch.Tensor:
        return self.w[name].float()

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.W(f"{LM}.embed_tokens.weight")[torch.tensor(ids, device=self.device)]

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.W(f"{name}.weight").T
        return y + self.W(f"{name}.bias") if f"{name}.bias" in self.w else y

    def timestep_features(self, t: float) -> torch.Tensor:
        k = torch.arange(128, dtype=torch.float32, device=self.device)
        ang = t * torch.exp(-math.log(10000.0) * k / 128)
        f = torch.cat([torch.cos(ang), torch.sin(ang)])
        h = self.lin("time_embedder.mlp.0", f)
        return self.lin("time_embedder.mlp.2", h * torch.sigmoid(h))

    def latent_ids(self, h: int, w: int) -> torch.Tensor:
        return torch.tensor([r * self.max_latent + c for r in range(h) for c in range(w)], device=self.device)

    def image_block(self, tokens: torch.Tensor, t: float, h: int, w: int) -> Block:
        lat = self.lin("vae2llm", tokens) + self.timestep_features(t) + self.W("latent_pos_embed.pos_embed")[self.latent_ids(h, w)]
        emb = torch.cat([self.embed([self.tid("<|vision_start|>")]), lat, self.embed([self.tid("<|vision_end|>")])])
        gen = torch.zeros(len(emb), dtype=torch.bool, device=self.device)
        gen[1:-1] = True
        return Block(emb, gen, causal=False, advance=1)

    def text_block(self, text: str) -> Block:
        ids = [self.tid("<|im_start|>")] + self.tok(text, add_special_tokens=False)["input_ids"] + [self.tid("<|im_end|>")]
        return Block(self.embed(ids), torch.zeros(len(ids), dtype=torch.bool, device=self.device), causal=True, advance=len(ids))

    def vit_block(self, image) -> Block:
        size = self.cfg["vit_config"]["image_size"]
        pix = _to_tensor(image, size, size).to(self.device)
        with torch.no_grad():
            feats = self.vit(pixel_values=pix[None]).last_hidden_state[0]
        h = self.lin("connector.fc1", feats)
        h = self.lin("connector.fc2", torch.nn.functional.gelu(h, approximate="tanh"))
        # BAGEL's frozen sin-cos table, computed exactly as ByteDance's PositionEmbedding builds it
        # (and vLLM's Bagel recomputes it); the checkpoint's copy is rounded to bfloat16.
        table = sincos_2d(self.hidden, self.cfg["vit_max_num_patch_per_side"]).float().to(self.device)
        h = h + table[: len(h)]  # full grid: ids 0..n-1 row-major
        emb = torch.cat([self.embed([self.tid("<|vision_start|>")]), h, self.embed([self.tid("<|vision_end|>")])])
        return Block(emb, torch.zeros(len(emb), dtype=torch.bool, device=self.device), causal=False, advance=1)

    def vae_block(self, image, height: int, width: int) -> Block:
        with torch.no_grad():
            mean = self.vae.encode(_to_tensor(image, height, width)[None].to(self.device)).latent_dist.mean[0]
        z = (mean - SHIFT) * SCALE
        h, w = height // self.down, width // self.down
        tokens = torch.einsum("chpwq->hwpqc", z.reshape(self.z, h, self.p, w, self.p)).reshape(h * w, -1)
        return self.image_block(tokens, 0.0, h, w)

    # ---- the full-sequence MoT ------------------------------------------------------
    def _norm(self, x: torch.Tensor, name: str, gen: torch.Tensor) -> torch.Tensor:
        def rms(w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.where(gen.view(shape), rms(self.W(f"{name}_moe_gen.weight")), rms(self.W(f"{name}.weight")))

    def _both(self, name: str, x: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        return torch.where(gen[:, None], self.lin(name.format("_moe_gen"), x), self.lin(name.format(""), x))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        half = self.hd // 2
        inv = self.theta ** (-torch.arange(half, dtype=torch.float32, device=self.device) * 2 / self.hd)
        ang = pos[:, None].float() * inv  # (n, half)
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def forward(self, blocks: list[Block]) -> torch.Tensor:
        """Final hidden states of the whole sequence."""
        x = torch.cat([b.embeds for b in blocks])
        gen = torch.cat([b.gen for b in blocks])
        pos, block_id, causal, p = [], [], [], 0
        for i, b in enumerate(blocks):
            n = len(b.embeds)
            pos += list(range(p, p + n)) if b.causal else [p] * n
            block_id += [i] * n
            causal += [b.causal] * n
            p += b.advance
        pos, block_id, causal = (torch.tensor(v, device=self.device) for v in (pos, block_id, causal))
        idx = torch.arange(len(x), device=self.device)
        earlier = block_id[None, :] < block_id[:, None]
        same = block_id[None, :] == block_id[:, None]
        allowed = earlier | (same & (~causal[:, None] | (idx[None, :] <= idx[:, None])))
        bias = torch.zeros(allowed.shape, device=self.device).masked_fill(~allowed, float("-inf"))
        group = self.heads // self.kv_heads
        for layer in range(self.layers):
            pre = f"{LM}.layers.{layer}"
            h = self._norm(x, f"{pre}.input_layernorm", gen)
            q = self._both(f"{pre}.self_attn.q_proj{{}}", h, gen).view(len(x), self.heads, self.hd)
            k = self._both(f"{pre}.self_attn.k_proj{{}}", h, gen).view(len(x), self.kv_heads, self.hd)
            v = self._both(f"{pre}.self_attn.v_proj{{}}", h, gen).view(len(x), self.kv_heads, self.hd)
            q = self._rope(self._norm(q, f"{pre}.self_attn.q_norm", gen), pos)
            k = self._rope(self._norm(k, f"{pre}.self_attn.k_norm", gen), pos)
            outs = []
            for head in range(self.heads):
                kh, vh = k[:, head // group], v[:, head // group]
                scores = q[:, head] @ kh.T / math.sqrt(self.hd) + bias
                outs.append(torch.softmax(scores, dim=-1) @ vh)
            x = x + self._both(f"{pre}.self_attn.o_proj{{}}", torch.cat(outs, dim=-1), gen)
            h = self._norm(x, f"{pre}.post_attention_layernorm", gen)
            gate, up = self._both(f"{pre}.mlp{{}}.gate_proj", h, gen), self._both(f"{pre}.mlp{{}}.up_proj", h, gen)
            x = x + self._both(f"{pre}.mlp{{}}.down_proj", torch.nn.functional.silu(gate) * up, gen)
        return self._norm(x, f"{LM}.norm", gen)

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt: str, *, height: int, width: int, seed: int, steps: int, image=None, negative_prompt: str | None = None,
        timestep_shift: float = 3.0, cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0,
    ) -> np.ndarray:
        """One image, (H, W, 3) uint8."""
        if image is None:
            contexts = {"cond": [self.text_block(prompt)],
                        "cfg_text": [] if negative_prompt is None else [self.text_block(negative_prompt)]}
        else:
            img_blocks = [self.vae_block(image, height, width), self.vit_block(image)]
            contexts = {"cond": img_blocks + [self.text_block(prompt)],
                        "cfg_text": img_blocks + ([] if negative_prompt is None else [self.text_block(negative_prompt)]),
                        "cfg_img": [self.text_block(prompt)]}
        h, w = height // self.down, width // self.down
        x = torch.randn(1, h * w, self.p * self.p * self.z, generator=torch.Generator("cpu").manual_seed(seed))[0].to(self.device)
        ts = torch.linspace(1, 0, steps)
        ts = timestep_shift * ts / (1 + (timestep_shift - 1) * ts)
        for i in range(steps - 1):
            t = float(ts[i])

            def velocity(branch: str) -> torch.Tensor:
                out = self.forward(contexts[branch] + [self.image_block(x, t, h, w)])
                return self.lin("llm2vae", out[-(h * w) - 1 : -1])

            inside = cfg_interval[0] < t <= cfg_interval[1]
            text_s = cfg_text_scale if inside else 1.0
            img_s = cfg_img_scale if (inside and image is not None) else 1.0
            v = velocity("cond")
            if text_s > 1.0:
                v_text = velocity("cfg_text")
                v_img = velocity("cfg_img") if img_s > 1.0 else None
                mixed = v_text + text_s * (v - v_text)
                if cfg_renorm_type == "text_channel":
                    r = (v.norm(dim=-1, keepdim=True) / (mixed.norm(dim=-1, keepdim=True) + 1e-8)).clamp(cfg_renorm_min, 1.0)
                    mixed = mixed * r
                    v = v_img + img_s * (mixed - v_img) if v_img is not None else mixed
                else:
                    if v_img is not None:
                        mixed = v_img + img_s * (mixed - v_img)
                    if cfg_renorm_type == "global":
                        r = (v.norm() / (mixed.norm() + 1e-8)).clamp(cfg_renorm_min, 1.0)
                    else:
                        r = (v.norm(dim=-1, keepdim=True) / (mixed.norm(dim=-1, keepdim=True) + 1e-8)).clamp(cfg_renorm_min, 1.0)
                    v = mixed * r
            x = x - v * float(ts[i] - ts[i + 1])
        z = torch.einsum("hwpqc->chpwq", x.reshape(h, w, self.p, self.p, self.z)).reshape(1, self.z, h * self.p, w * self.p)
        img = self.vae.decode(z / SCALE + SHIFT).sample[0]
        return ((img * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _to_tensor(image, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
