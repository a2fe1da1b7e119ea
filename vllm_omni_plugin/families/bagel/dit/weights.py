"""Read a BAGEL checkpoint directory (ByteDance-Seed/BAGEL-7B-MoT layout).

The directory has no model_index.json: config.json (llm_config, vit_config,
vae_config, latent geometry), ema.safetensors (LLM with both MoT experts, ViT,
connector, generation embeddings), ae.safetensors (FLUX AutoEncoder) and the
Qwen2 tokenizer files. Weights stay a flat {name: tensor} dict; the layer code
(mot.py, vit.py, autoencoder.py) reads them by the checkpoint's own names, so a
renamed or missing tensor fails loudly with its name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ....registry import identify

# FLUX AutoEncoder latent normalisation (ae.safetensors carries no config; these
# are the constants BAGEL's loader passes to the FLUX AutoEncoder).
FLUX_SCALE_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159

TIME_FREQ_DIM = 256  # sinusoidal features of the DiT timestep embedder (time_embedder.mlp.0 input)


def is_bagel_checkpoint(path: str | Path) -> bool:
    """True for a BAGEL directory, as the family registry identifies checkpoints (`families.identify`)."""
    try:
        info = identify(path)
    except (OSError, ValueError):  # an unreadable or malformed config.json is no BAGEL checkpoint
        return False
    return info.layout == "transformers" and info.family is not None and info.family.name == "bagel"


@dataclass(frozen=True)
class BagelConfig:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    rms_eps: float
    rope_theta: float
    vocab: int
    latent_patch: int
    z_channels: int
    vae_downsample: int
    max_latent_size: int
    vae_ch: int
    vae_ch_mult: tuple[int, ...]
    vae_res_blocks: int
    vit_patch: int
    vit_per_side: int
    vit_heads: int
    vit_eps: float
    vit_act: str
    connector_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample x latent patch (16 for BAGEL)."""
        return self.vae_downsample * self.latent_patch

    @property
    def max_image_side(self) -> int:
        """Largest side the latent position table covers (1024 px for BAGEL-7B-MoT)."""
        return self.max_latent_size * self.latent_downsample

    @property
    def vit_image_size(self) -> int:
        return self.vit_patch * self.vit_per_side

    @classmethod
    def from_json(cls, cfg: dict[str, Any]) -> "BagelConfig":
        llm, vit, vae = cfg["llm_config"], cfg["vit_config"], cfg["vae_config"]
        return cls(
            hidden=llm["hidden_size"],
            heads=llm["num_attention_heads"],
            kv_heads=llm["num_key_value_heads"],
            layers=llm["num_hidden_layers"],
            rms_eps=llm.get("rms_norm_eps", 1e-6),
            rope_theta=llm.get("rope_theta", 1e6),
            vocab=llm["vocab_size"],
            latent_patch=cfg.get("latent_patch_size", 2),
            z_channels=vae.get("z_channels", 16),
            vae_downsample=vae.get("downsample", 8),
            max_latent_size=cfg.get("max_latent_size", 64),
            # The real vae_config states only downsample and z_channels: FLUX's values are implied.
            vae_ch=vae.get("ch", 128),
            vae_ch_mult=tuple(vae.get("ch_mult", (1, 2, 4, 4))),
            vae_res_blocks=vae.get("num_res_blocks", 2),
            vit_patch=vit["patch_size"],
            vit_per_side=cfg.get("vit_max_num_patch_per_side", 70),
            vit_heads=vit["num_attention_heads"],
            vit_eps=vit.get("layer_norm_eps", 1e-6),
            vit_act=vit.get("hidden_act", "gelu_pytorch_tanh"),
            connector_act=cfg.get("connector_act", "gelu_pytorch_tanh"),
        )


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """BAGEL's frozen 2-D sin-cos table, (side*side, dim); row h*side + w.

    The first half of each row encodes w, the second half h; each half is
    [sin(pos * omega), cos(pos * omega)] with omega = 10000 ** -(k / (dim/4)).
    """
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    h, w = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(w), encode(h)], dim=1).float()


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unsupported activation {name!r}")


class BagelText:
    """A BAGEL checkpoint's tokenizer (loaded on first use) and special tokens.

    Both stages read prompts with it: the DiT stage's own prefill (encode.py) and
    the AR hand-over, which builds the AR stage's prompts without touching the DiT's
    weights (families/bagel/orchestrator.py).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return self._tokenizer

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of {self.path} lacks BAGEL's special token {token}")
        return tid


def read_bagel_config(path: str | Path) -> BagelConfig:
    """config.json of a BAGEL directory as a BagelConfig (no weights read)."""
    path = Path(path)
    if not is_bagel_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a BAGEL checkpoint (config.json with model_type 'bagel')")
    return BagelConfig.from_json(json.loads((path / "config.json").read_text()))


class BagelModel:
    """Config + weights (+ tokenizer, loaded on first use) of one BAGEL checkpoint."""

    def __init__(self, path: str | Path, config: BagelConfig, ema: dict[str, torch.Tensor], ae: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.path = Path(path)
        self.config = config
        self.w = ema
        self.ae = ae
        self.dtype = dtype
        self.device = device
        self.text = BagelText(path)
        #: token id -> embedding row, where the embedding table itself was not loaded (dit_only)
        self.embed_rows: dict[int, torch.Tensor] = {}
        # ViT depth = the layers present in the weights. BAGEL's own loader builds
        # vit_config.num_hidden_layers - 1 layers; the real checkpoint stores exactly
        # that many (26 of 27), and vLLM runs the stored ones too.
        prefix = "vit_model.vision_model.encoder.layers."
        self.vit_layers = len({n[len(prefix):].split(".")[0] for n in ema if n.startswith(prefix)})
        self._vit_pos_table: torch.Tensor | None = None

    @property
    def vit_pos_table(self) -> torch.Tensor:
        """BAGEL's frozen 2-D sin-cos table of ViT positions, computed exactly (not read from the checkpoint).

        ByteDance's `PositionEmbedding` builds this table with `get_2d_sincos_pos_embed`
        and never trains it; the checkpoint's copy is that table rounded to bfloat16
        (off by up to ~2e-3), which in float32 moves the ViT block's K/V by ~1e-3.
        vLLM's Bagel recomputes the table instead of loading it, so the AR stage
        uses the exact one: this is the same table.
        """
        if self._vit_pos_table is None:
            c = self.config
            self._vit_pos_table = sincos_2d(c.hidden, c.vit_per_side).to(self.device, self.dtype)
        return self._vit_pos_table

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    def token_id(self, token: str) -> int:
        return self.text.token_id(token)

    # ---- generation-side embeddings -------------------------------------------
    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        """DiT timestep embedder: [cos, sin] features of t (in [0, 1]) -> MLP."""
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        feats = torch.cat([args.cos(), args.sin()], dim=-1).to(self.dtype)
        h = F.linear(feats, self.w["time_embedder.mlp.0.weight"], self.w["time_embedder.mlp.0.bias"])
        return F.linear(F.silu(h), self.w["time_embedder.mlp.2.weight"], self.w["time_embedder.mlp.2.bias"])

    def latent_position_ids(self, height: int, width: int) -> torch.Tensor:
        """Row-major ids into the (max_latent_size x max_latent_size) table, as BAGEL extrapolates."""
        c, d = self.config, self.config.latent_downsample
        rows = torch.arange(height // d, device=self.device)
        cols = torch.arange(width // d, device=self.device)
        return (rows[:, None] * c.max_latent_size + cols[None, :]).flatten()

    def latent_embed(self, x: torch.Tensor, t: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """Patchified latents (rows, tokens, p*p*z) at flow times t (rows,) -> LLM inputs (rows, tokens, hidden)."""
        h = F.linear(x.to(self.dtype), self.w["vae2llm.weight"], self.w["vae2llm.bias"])
        return h + self.time_embed(t)[:, None, :] + self.w["latent_pos_embed.pos_embed"][pos_ids]

    def latent_out(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states of latent tokens -> velocity in patchified latent space."""
        return F.linear(h, self.w["llm2vae.weight"], self.w["llm2vae.bias"])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if EMBED_TABLE in self.w:
            return self.w[EMBED_TABLE][ids]
        # A DiT-only load (load_bagel_model(dit_only=True)) keeps the rows its forward reads.
        missing = sorted({int(i) for i in ids.flatten()} - set(self.embed_rows))
        if missing:
            raise KeyError(f"token ids {missing} are not among the embedding rows this DiT-only load "
                           f"keeps ({', '.join(MARKERS)}); load the whole checkpoint to prefill contexts")
        return torch.stack([self.embed_rows[int(i)] for i in ids.flatten()]).reshape(*ids.shape, -1)

    # ---- latent layout ------------------------------------------------------------
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(z, H, W) VAE latent -> (H/p * W/p, p*p*z) tokens, row-major, channels last (BAGEL's order)."""
        c, p = self.config.z_channels, self.config.latent_patch
        _, hh, ww = z.shape
        z = z.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0)
        return z.reshape((hh // p) * (ww // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(rows, tokens, p*p*z) -> (rows, z, H/8, W/8), the inverse of `patchify`."""
        c, p, d = self.config.z_channels, self.config.latent_patch, self.config.latent_downsample
        h, w = height // d, width // d
        x = tokens.reshape(-1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, h * p, w * p)


#: The token embedding table (152k rows): the DiT forward reads two of its rows, BAGEL's image markers.
EMBED_TABLE = "language_model.model.embed_tokens.weight"
MARKERS = ("<|vision_start|>", "<|vision_end|>")


def dit_forward_weight(file: str, name: str) -> bool:
    """True for a checkpoint tensor the DiT stage's denoising forward and decode read.

    Behind the AR stage the DiT gets each context's KV from vLLM, so it needs the
    MoT layers of both experts (the image markers run through the understanding
    expert every step, the latents through the generation expert), the final norms,
    the latent in/out projections, the timestep and latent-position embeddings, and
    the FLUX decoder. It never reads the LM head, the ViT and its connector, the ViT
    position table, the FLUX encoder (img2img's VAE tokens are the AR stage's), nor
    the embedding table but its two marker rows (`load_bagel_model` keeps those).

    Args:
        file: "ema.safetensors" or "ae.safetensors".
        name: the tensor's name in that file.
    """
    if file == "ae.safetensors":
        return name.startswith("decoder.")
    return name.startswith(("language_model.model.layers.", "language_model.model.norm", "vae2llm.", "llm2vae.",
                            "time_embedder.", "latent_pos_embed."))


def _read(file: Path, keep: Any, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of `file` whose names `keep` accepts, read one by one (the rest never leaves the disk)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k).to(dtype) for k in f.keys() if keep(k)}


def load_bagel_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     dit_only: bool = False) -> BagelModel:
    """Load config.json, ema.safetensors and ae.safetensors of a BAGEL directory.

    The LLM/ViT weights run in `dtype`; the FLUX AE stays float32 as stored
    unless `dtype` is lower precision on CUDA (then it follows `dtype`).

    Args:
        path: the checkpoint directory.
        dtype, device: where the weights live.
        dit_only: load only what the DiT forward reads (`dit_forward_weight`, plus the
            two marker rows of the embedding table): the DiT stage behind the AR stage,
            which holds the rest. False: everything, for a standalone DiT that prefills
            its own contexts (`encode_context`).
    """
    path, device = Path(path), torch.device(device)
    config = read_bagel_config(path)
    for name in ("ema.safetensors", "ae.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} lacks {name}")
    ae_dtype = dtype if device.type == "cuda" else torch.float32
    if not dit_only:
        ema = {k: v.to(dtype) for k, v in load_file(str(path / "ema.safetensors"), device=str(device)).items()}
        ae = {k: v.to(ae_dtype) for k, v in load_file(str(path / "ae.safetensors"), device=str(device)).items()}
        return BagelModel(path, config, ema, ae, dtype, device)
    ema = _read(path / "ema.safetensors", lambda k: dit_forward_weight("ema.safetensors", k), dtype, device)
    ae = _read(path / "ae.safetensors", lambda k: dit_forward_weight("ae.safetensors", k), ae_dtype, device)
    model = BagelModel(path, config, ema, ae, dtype, device)
    from safetensors import safe_open

    with safe_open(str(path / "ema.safetensors"), framework="pt", device=str(device)) as f:
        table = f.get_slice(EMBED_TABLE)
        ids = [model.token_id(t) for t in MARKERS]
        model.embed_rows = {i: table[i : i + 1].to(dtype)[0] for i in ids}
    return model
