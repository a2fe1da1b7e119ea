"""Independent plain-PyTorch reference of BAGEL understanding (img2text / text2text), a test oracle.

Written from ByteDance-Seed/Bagel (modeling/bagel/bagel.py `prepare_vit_images`,
`forward_cache_update_vit`, `prepare_prompts`, `generate_text`; siglip_navit.py;
qwen2_navit.py), sharing no code with vLLM. It reads the checkpoint's
safetensors itself and runs, in float64:

  ViT        transformers' SiglipVisionModel (BAGEL's NaViT with rope=False is
             this model for one image at its native grid: learned position
             embedding indexed by h * vit_max_num_patch_per_side + w, full
             attention among the image's patches, post-layernorm), with as many
             layers as the weights hold (BAGEL builds vit_config minus one layer,
             which for the real checkpoint is exactly the 26 stored layers);
             the patch linear of the checkpoint is turned back into its conv.
  connector  fc1 -> gelu(tanh) -> fc2, plus the frozen 2-D sin-cos table at
             the same flattened ids (computed here exactly; the checkpoint stores
             it in bfloat16).
  LLM        transformers' Qwen3 modules, which are BAGEL's understanding
             expert: Qwen2 projections with biases on q/k/v, per-head RMSNorm on
             q and k before RoPE (qk_norm), no bias on o_proj. The MoT
             generation expert is not used by understanding (mode "und").

A prompt is a token list in which each image is a run of `<|image_pad|>`
(optionally wrapped in `<|vision_start|>` / `<|vision_end|>`); the run's rows
take the image's ViT embeddings. Two layouts say which positions and which
bidirectional spans the sequence gets:

  "bagel"  what ByteDance's inference does: an image block
           [<|vision_start|>, ViT tokens, <|vision_end|>] shares ONE RoPE
           position and attends bidirectionally inside itself (markers
           included); text positions advance by one per token, the token after
           an image block gets the block's position + 1.
  "vllm"   what vLLM 0.32's BagelForConditionalGeneration does: one RoPE
           position per token, bidirectional attention over the `<|image_pad|>`
           run only (mm-prefix ranges are the placeholder tokens).
  "causal" the "vllm" positions with no bidirectional span at all: what vLLM's
           CPU backend computed before this plugin's cpu_mm_prefix patches.

Everything else is causal. Generation is greedy, one full forward per token
(no KV cache), each new token at the next position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

Layout = Literal["bagel", "vllm", "causal"]
DTYPE = torch.float64


@dataclass(frozen=True)
class Sequence:
    token_ids: list[int]
    positions: list[int]
    bidirectional: list[tuple[int, int]]  # inclusive row ranges
    image_runs: list[tuple[int, int]]  # inclusive rows of each <|image_pad|> run


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table (BAGEL's PositionEmbedding): row h*side + w; first half w, second half h."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    w, h = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    return torch.from_numpy(np.concatenate([one_axis(dim // 2, w.reshape(-1)), one_axis(dim // 2, h.reshape(-1))], axis=1))


class BagelUnderstanding:
    """`device`, `dtype`: where and in what precision it runs (float64 on the CPU by default;
    the GPU tier runs float32 with TF32 off, as full-size float64 would not fit beside vLLM)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = DTYPE) -> None:
        from transformers import AutoTokenizer

        self.device, self.dtype = torch.device(device), dtype
        self.path = Path(path)
        self.cfg = json.loads((self.path / "config.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(str(self.path))
        weights = {k: v for k, v in load_file(str(self.path / "ema.safetensors")).items() if "moe_gen" not in k}
        self.vit = self._vit(weights)
        self.llm = self._llm(weights)
        self.connector = {k: v for k, v in weights.items() if k.startswith("connector.")}
        side = self.cfg["vit_max_num_patch_per_side"]
        self.vit_pos_embed = sincos_2d(self.cfg["llm_config"]["hidden_size"], side).to(self.device, dtype)
        self.ids = {t: self.tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}

    # ------------------------------------------------------------------ weights

    def _vit(self, w: dict[str, torch.Tensor]):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        vit_cfg = self.cfg["vit_config"]
        layers = len({k.split(".")[4] for k in w if k.startswith("vit_model.vision_model.encoder.layers.")})
        model = SiglipVisionModel(SiglipVisionConfig(**{**vit_cfg, "num_hidden_layers": layers, "vision_use_head": False})).to(self.device, self.dtype).eval()
        target = model.state_dict()
        # transformers 5 drops the "vision_model." level of SiglipVisionModel's names; accept both.
        strip = "vit_model.vision_model." if "post_layernorm.weight" in target else "vit_model."
        state = {k[len(strip):]: v for k, v in w.items() if k.startswith(strip)}
        patch = next(k for k in state if k.endswith("patch_embedding.weight"))
        p = vit_cfg["patch_size"]
        # BAGEL patchifies pixels as (row, col, channel) and stores the patch conv as that linear.
        state[patch] = state[patch].reshape(-1, p, p, 3).permute(0, 3, 1, 2).contiguous()
        model.load_state_dict(state, strict=True)
        return model

    def _llm(self, w: dict[str, torch.Tensor]):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        c = self.cfg["llm_config"]
        config = Qwen3Config(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"], head_dim=c["hidden_size"] // c["num_attention_heads"],
            rms_norm_eps=c["rms_norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
            attention_bias=True, tie_word_embeddings=False, max_position_embeddings=c["max_position_embeddings"],
            attn_implementation="eager",
        )
        model = Qwen3ForCausalLM(config).to(self.device, self.dtype).eval()
        state = {
            k.removeprefix("language_model."): v
            for k, v in w.items()
            if k.startswith("language_model.") and "moe_gen" not in k
        }
        for i in range(config.num_hidden_layers):  # BAGEL's o_proj has no bias
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(config.hidden_size, dtype=self.dtype)
        model.load_state_dict(state, strict=True)
        return model

    # ------------------------------------------------------------------ pieces

    def pixels(self, image) -> torch.Tensor:
        """(3, S, S) in [-1, 1]; the image must already have the ViT's size (no resize policy here)."""
        size = self.cfg["vit_config"]["image_size"]
        image = image.convert("RGB")
        assert image.size == (size, size), f"reference takes {size}x{size} images, got {image.size}"
        return torch.from_numpy(np.asarray(image, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)

    @torch.no_grad()
    def image_embeds(self, image) -> torch.Tensor:
        """(patches, hidden): ViT -> connector -> + vit_pos_embed."""
        feats = self.vit(pixel_values=self.pixels(image)[None].to(self.device, self.dtype)).last_hidden_state[0]
        c = {k: v.to(self.device, self.dtype) for k, v in self.connector.items()}
        lin = lambda name, x: x @ c[f"{name}.weight"].T + c[f"{name}.bias"]  # noqa: E731
        h = lin("connector.fc2", torch.nn.functional.gelu(lin("connector.fc1", feats), approximate="tanh"))
        side = self.cfg["vit_config"]["image_size"] // self.cfg["vit_config"]["patch_size"]
        max_side = self.cfg["vit_max_num_patch_per_side"]
        flat = (torch.arange(side)[:, None] * max_side + torch.arange(side)).flatten().to(self.device)
        return h + self.vit_pos_embed[flat]

    def sequence(self, token_ids: list[int], layout: Layout) -> Sequence:
        runs = _runs(token_ids, self.ids["<|image_pad|>"])
        if layout != "bagel":
            return Sequence(list(token_ids), list(range(len(token_ids))), [] if layout == "causal" else runs, runs)
        blocks = []
        for start, end in runs:  # the image block takes in its markers
            if start > 0 and token_ids[start - 1] == self.ids["<|vision_start|>"]:
                start -= 1
            if end + 1 < len(token_ids) and token_ids[end + 1] == self.ids["<|vision_end|>"]:
                end += 1
            blocks.append((start, end))
        positions, p, row = [], 0, 0
        for start, end in blocks + [(len(token_ids), len(token_ids))]:
            positions += range(p, p + start - row)  # text before the block
            p += start - row
            if start < len(token_ids):
                positions += [p] * (end - start + 1)
                p += 1
            row = end + 1
        return Sequence(list(token_ids), positions, blocks, runs)

    # ------------------------------------------------------------------ model

    @torch.no_grad()
    def logits(self, seq: Sequence, images: list[torch.Tensor]) -> torch.Tensor:
        """(len, vocab) next-token logits at every row."""
        assert len(images) == len(seq.image_runs)
        x = self.llm.model.embed_tokens(torch.tensor(seq.token_ids, device=self.device))
        for (start, end), emb in zip(seq.image_runs, images):
            assert end - start + 1 == len(emb), "placeholder run and image token count differ"
            x[start : end + 1] = emb.to(self.device, self.dtype)
        n = len(seq.token_ids)
        rows = torch.arange(n, device=self.device)
        allowed = rows[None, :] <= rows[:, None]
        for start, end in seq.bidirectional:
            inside = (rows >= start) & (rows <= end)
            allowed |= inside[:, None] & inside[None, :]
        mask = torch.zeros(n, n, dtype=self.dtype, device=self.device).masked_fill(~allowed, torch.finfo(self.dtype).min)
        position_ids = torch.tensor([seq.positions], device=self.device)
        out = self.llm(inputs_embeds=x[None], attention_mask=mask[None, None], position_ids=position_ids, logits_to_keep=0)
        return out.logits[0]

    def prompt_logprobs(self, seq: Sequence, images: list[torch.Tensor]) -> torch.Tensor:
        """(len - 1,) log p(token i | tokens < i), for i = 1 ... len - 1."""
        logp = self.logits(seq, images).log_softmax(-1)
        return logp[:-1].gather(1, torch.tensor(seq.token_ids[1:], device=logp.device)[:, None])[:, 0].cpu()

    def greedy(self, seq: Sequence, images: list[torch.Tensor], n: int) -> tuple[list[int], list[float]]:
        """n greedy tokens and their logprobs; generated tokens are causal text at the next positions."""
        tokens, logprobs = [], []
        for _ in range(n):
            logp = self.logits(seq, images)[-1].log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            seq = Sequence(seq.token_ids + [token], seq.positions + [seq.positions[-1] + 1], seq.bidirectional, seq.image_runs)
        return tokens, logprobs


def _runs(token_ids: list[int], token: int) -> list[tuple[int, int]]:
    """Inclusive (start, end) of each maximal run of `token`."""
    runs, start = [], None
    for i, t in enumerate(token_ids + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs
