"""BAGEL-7B-MoT checkpoints (ByteDance-Seed/BAGEL-7B-MoT layout), seeded random weights.

Files, as in the real repository:

  config.json             model_type "bagel", BagelForConditionalGeneration: what
                          vLLM's BagelConfig reads (llm_config with qk_norm, vit_config,
                          vae_config, latent/ViT geometry)
  llm_config.json         the Qwen2 config ByteDance's code reads; it has no
                          qk_norm / layer_module: BAGEL's loaders set qk_norm=True
                          and layer_module="Qwen2MoTDecoderLayer" themselves
  vit_config.json         the SigLIP-so400m NaViT config (27 layers; the weights have
                          26, vLLM trims the config to match)
  ema.safetensors         bfloat16: language_model.* (Qwen2 with q/k norms, plus the
                          MoT generation expert: *_moe_gen projections, norms, mlp,
                          model.norm_moe_gen), vit_model.* (patch embedding stored as
                          a 2-D linear, as BAGEL trains it), connector, vit_pos_embed,
                          latent_pos_embed, time_embedder, vae2llm, llm2vae
  ae.safetensors          float32 FLUX AutoEncoder (encoder.* / decoder.*, z 16, /8)
  tokenizer files         Qwen2 tokenizer (tokenizers.write_qwen2_tokenizer)
  preprocessor_config.json  SiglipImageProcessor resizing to the ViT's image_size, so
                          vLLM's placeholder count vit_max_num_patch_per_side**2
                          equals the ViT's patch count

vLLM 0.32 loads every *.safetensors of the folder (there is no index file, as in
the real repository) and skips the generation weights and the VAE by name.

`full` has the real dimensions (~14.5B parameters, ~29 GB ema + 0.3 GB ae).
`build(..., weights=False)` writes everything but the two safetensors files
(enough for `vllm.LLM(out, load_format="dummy")` on a GPU);
`build_in_memory("full", seed, device="cuda")` returns the state dicts without
touching the disk (bytes match the files only for the same device).

Init: every tensor comes from its own generator seeded by (seed, name), so one
tensor can be made alone and the order of construction does not matter. Scales
keep activations near unit size (matrices 1/sqrt(fan_in), embeddings 1) and
give logits a spread of ~2 (lm_head 2/sqrt(hidden)), so greedy decoding is
decided by clear margins, not by rounding. Norm scales are 1 + 0.1 noise and
biases 0.1 noise so that a loader that drops one of them changes the outputs.
The generation expert is drawn independently of the understanding weights
(the real one starts as a copy and diverges in training), so routing a token
through the wrong expert shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .dit.weights import sincos_2d  # BAGEL's frozen tables (the stage's own math)
from ...checkpoints.weights import stream_seed
from ...checkpoints.tokenizers import QWEN2_MODEL_VOCAB, write_qwen2_tokenizer


@dataclass(frozen=True)
class BagelDims:
    # Qwen2 LLM
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    intermediate: int
    vocab: int
    # SigLIP ViT
    vit_hidden: int
    vit_heads: int
    vit_intermediate: int
    vit_layers: int  # layers in the weights
    vit_config_layers: int  # layers vit_config.json states (BAGEL drops the last one)
    patch: int
    patches_per_side: int  # vit_max_num_patch_per_side == image_size // patch
    # generation
    max_latent_size: int
    # FLUX VAE
    vae_ch: int
    latent_patch: int = 2
    z_channels: int = 16
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # three halvings: downsample 8
    vae_res_blocks: int = 2

    @property
    def image_size(self) -> int:
        return self.patch * self.patches_per_side


PRESETS: dict[str, BagelDims] = {
    # head_dim 64 for the LLM and the ViT: vLLM's CPU attention rejects 16.
    "tiny": BagelDims(
        hidden=128, heads=2, kv_heads=1, layers=2, intermediate=256, vocab=QWEN2_MODEL_VOCAB,
        vit_hidden=128, vit_heads=2, vit_intermediate=256, vit_layers=2, vit_config_layers=2,
        patch=14, patches_per_side=4, max_latent_size=8, vae_ch=32,
    ),
    "full": BagelDims(
        hidden=3584, heads=28, kv_heads=4, layers=28, intermediate=18944, vocab=152064,
        vit_hidden=1152, vit_heads=16, vit_intermediate=4304, vit_layers=26, vit_config_layers=27,
        patch=14, patches_per_side=70, max_latent_size=64, vae_ch=128,
    ),
}

# FLUX AutoEncoder constants the real ae.safetensors is used with.
VAE_SCALE_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159

# init kinds -> how `_tensor` fills them
_MATRIX, _BIAS, _NORM, _EMBED, _LM_HEAD, _SINCOS = "matrix", "bias", "norm", "embed", "lm_head", "sincos"
Spec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, kind)


# ---------------------------------------------------------------- configs


def _qwen2_config(d: BagelDims, tok) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": d.layers,
        "model_type": "qwen2",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": d.vocab,
    }


def _vit_config(d: BagelDims) -> dict:
    return {
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": d.vit_hidden,
        "image_size": d.image_size,
        "intermediate_size": d.vit_intermediate,
        "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model",
        "num_attention_heads": d.vit_heads,
        "num_channels": 3,
        "num_hidden_layers": d.vit_config_layers,
        "patch_size": d.patch,
    }


def _vae_config(d: BagelDims) -> dict:
    vae = {"downsample": 2 ** (len(d.vae_ch_mult) - 1), "z_channels": d.z_channels}
    full = PRESETS["full"]
    if (d.vae_ch, d.vae_ch_mult, d.vae_res_blocks) != (full.vae_ch, full.vae_ch_mult, full.vae_res_blocks):
        # Not in the real config (FLUX's values are implied there); a smaller VAE
        # must say what it is. Readers default to the FLUX values when absent.
        vae.update(ch=d.vae_ch, ch_mult=list(d.vae_ch_mult), num_res_blocks=d.vae_res_blocks)
    return vae


def configs(d: BagelDims, tok) -> dict[str, dict]:
    """file name -> JSON content, for every config file of the checkpoint."""
    llm = _qwen2_config(d, tok)
    return {
        "config.json": {
            "architectures": ["BagelForConditionalGeneration"],
            "model_type": "bagel",
            "visual_gen": True,
            "visual_und": True,
            "llm_config": {**llm, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer"},
            "vit_config": _vit_config(d),
            "vae_config": _vae_config(d),
            "latent_patch_size": d.latent_patch,
            "max_latent_size": d.max_latent_size,
            "vit_max_num_patch_per_side": d.patches_per_side,
            "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False,
            "timestep_shift": 1.0,
            "torch_dtype": "bfloat16",
        },
        "llm_config.json": llm,
        "vit_config.json": _vit_config(d),
        "preprocessor_config.json": {
            "image_processor_type": "SiglipImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": d.image_size, "width": d.image_size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    }


# ------------------------------------------------------------ weight specs


def _linear(spec: Spec, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    spec[f"{name}.weight"] = ((n_out, n_in), _MATRIX)
    if bias:
        spec[f"{name}.bias"] = ((n_out,), _BIAS)


def _norm(spec: Spec, name: str, dim: int, bias: bool = False) -> None:
    spec[f"{name}.weight"] = ((dim,), _NORM)
    if bias:
        spec[f"{name}.bias"] = ((dim,), _BIAS)


def ema_spec(d: BagelDims) -> Spec:
    """Names, shapes and init kinds of ema.safetensors."""
    s: Spec = {}
    head_dim = d.hidden // d.heads
    lm = "language_model.model"
    s[f"{lm}.embed_tokens.weight"] = ((d.vocab, d.hidden), _EMBED)
    for i in range(d.layers):
        layer = f"{lm}.layers.{i}"
        for gen in ("", "_moe_gen"):  # understanding expert, then generation expert
            attn = f"{layer}.self_attn"
            _linear(s, f"{attn}.q_proj{gen}", d.hidden, d.heads * head_dim)
            _linear(s, f"{attn}.k_proj{gen}", d.hidden, d.kv_heads * head_dim)
            _linear(s, f"{attn}.v_proj{gen}", d.hidden, d.kv_heads * head_dim)
            _linear(s, f"{attn}.o_proj{gen}", d.heads * head_dim, d.hidden, bias=False)
            _norm(s, f"{attn}.q_norm{gen}", head_dim)
            _norm(s, f"{attn}.k_norm{gen}", head_dim)
            _linear(s, f"{layer}.mlp{gen}.gate_proj", d.hidden, d.intermediate, bias=False)
            _linear(s, f"{layer}.mlp{gen}.up_proj", d.hidden, d.intermediate, bias=False)
            _linear(s, f"{layer}.mlp{gen}.down_proj", d.intermediate, d.hidden, bias=False)
            _norm(s, f"{layer}.input_layernorm{gen}", d.hidden)
            _norm(s, f"{layer}.post_attention_layernorm{gen}", d.hidden)
    _norm(s, f"{lm}.norm", d.hidden)
    _norm(s, f"{lm}.norm_moe_gen", d.hidden)
    s["language_model.lm_head.weight"] = ((d.vocab, d.hidden), _LM_HEAD)

    vit = "vit_model.vision_model"
    _linear(s, f"{vit}.embeddings.patch_embedding", 3 * d.patch * d.patch, d.vit_hidden)
    s[f"{vit}.embeddings.position_embedding.weight"] = ((d.patches_per_side**2, d.vit_hidden), _EMBED)
    for i in range(d.vit_layers):
        layer = f"{vit}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{layer}.self_attn.{proj}", d.vit_hidden, d.vit_hidden)
        _norm(s, f"{layer}.layer_norm1", d.vit_hidden, bias=True)
        _norm(s, f"{layer}.layer_norm2", d.vit_hidden, bias=True)
        _linear(s, f"{layer}.mlp.fc1", d.vit_hidden, d.vit_intermediate)
        _linear(s, f"{layer}.mlp.fc2", d.vit_intermediate, d.vit_hidden)
    _norm(s, f"{vit}.post_layernorm", d.vit_hidden, bias=True)

    _linear(s, "connector.fc1", d.vit_hidden, d.hidden)
    _linear(s, "connector.fc2", d.hidden, d.hidden)
    s["vit_pos_embed.pos_embed"] = ((d.patches_per_side**2, d.hidden), _SINCOS)
    s["latent_pos_embed.pos_embed"] = ((d.max_latent_size**2, d.hidden), _SINCOS)
    _linear(s, "time_embedder.mlp.0", 256, d.hidden)  # 256 = sinusoidal frequency features
    _linear(s, "time_embedder.mlp.2", d.hidden, d.hidden)
    patch_latent = d.latent_patch**2 * d.z_channels
    _linear(s, "vae2llm", patch_latent, d.hidden)
    _linear(s, "llm2vae", d.hidden, patch_latent)
    return s


def _conv(spec: Spec, name: str, n_in: int, n_out: int, k: int) -> None:
    spec[f"{name}.weight"] = ((n_out, n_in, k, k), _MATRIX)
    spec[f"{name}.bias"] = ((n_out,), _BIAS)


def _resnet(spec: Spec, name: str, n_in: int, n_out: int) -> None:
    _norm(spec, f"{name}.norm1", n_in, bias=True)
    _conv(spec, f"{name}.conv1", n_in, n_out, 3)
    _norm(spec, f"{name}.norm2", n_out, bias=True)
    _conv(spec, f"{name}.conv2", n_out, n_out, 3)
    if n_in != n_out:
        _conv(spec, f"{name}.nin_shortcut", n_in, n_out, 1)


def _mid(spec: Spec, name: str, ch: int) -> None:
    _resnet(spec, f"{name}.block_1", ch, ch)
    _norm(spec, f"{name}.attn_1.norm", ch, bias=True)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(spec, f"{name}.attn_1.{proj}", ch, ch, 1)
    _resnet(spec, f"{name}.block_2", ch, ch)


def ae_spec(d: BagelDims) -> Spec:
    """Names, shapes and init kinds of ae.safetensors (FLUX AutoEncoder: attention only in mid)."""
    s: Spec = {}
    chans = [d.vae_ch * m for m in d.vae_ch_mult]
    last = len(chans) - 1

    _conv(s, "encoder.conv_in", 3, d.vae_ch, 3)
    n_in = d.vae_ch
    for level, n_out in enumerate(chans):
        for j in range(d.vae_res_blocks):
            _resnet(s, f"encoder.down.{level}.block.{j}", n_in, n_out)
            n_in = n_out
        if level != last:
            _conv(s, f"encoder.down.{level}.downsample.conv", n_in, n_in, 3)
    _mid(s, "encoder.mid", n_in)
    _norm(s, "encoder.norm_out", n_in, bias=True)
    _conv(s, "encoder.conv_out", n_in, 2 * d.z_channels, 3)  # mean and log-variance

    _conv(s, "decoder.conv_in", d.z_channels, chans[last], 3)
    _mid(s, "decoder.mid", chans[last])
    n_in = chans[last]
    for level in reversed(range(len(chans))):  # decoder.up.{level}: index 0 is full resolution
        for j in range(d.vae_res_blocks + 1):
            _resnet(s, f"decoder.up.{level}.block.{j}", n_in, chans[level])
            n_in = chans[level]
        if level != 0:
            _conv(s, f"decoder.up.{level}.upsample.conv", n_in, n_in, 3)
    _norm(s, "decoder.norm_out", n_in, bias=True)
    _conv(s, "decoder.conv_out", n_in, 3, 3)
    return s


# ----------------------------------------------------------------- values


def _tensor(name: str, shape: tuple[int, ...], kind: str, seed: int, device: torch.device) -> torch.Tensor:
    """float32 values of one tensor, from a generator of its own."""
    if kind == _SINCOS:
        return sincos_2d(shape[1], math.isqrt(shape[0])).to(device)
    gen = torch.Generator(device=device).manual_seed(stream_seed(seed, name))
    noise = torch.randn(shape, generator=gen, device=device)
    if kind == _MATRIX:
        return noise.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if kind == _LM_HEAD:
        return noise.mul_(2.0 / math.sqrt(shape[1]))
    if kind == _NORM:
        return noise.mul_(0.1).add_(1.0)
    if kind == _BIAS:
        return noise.mul_(0.1)
    return noise  # _EMBED


def _tensors(spec: Spec, seed: int, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for name, (shape, kind) in spec.items():
        yield name, _tensor(name, shape, kind, seed, device).to(dtype)


def _weight_files(d: BagelDims) -> dict[str, tuple[Spec, torch.dtype]]:
    # dtypes of the real files: the EMA weights in bfloat16, the FLUX VAE in float32
    return {"ema.safetensors": (ema_spec(d), torch.bfloat16), "ae.safetensors": (ae_spec(d), torch.float32)}


def build_in_memory(
    preset: str, seed: int, *, device: str | torch.device = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """{"ema.safetensors": state dict, "ae.safetensors": state dict}, nothing written."""
    files = _weight_files(PRESETS[preset])
    return {file: dict(_tensors(spec, seed, dtype, torch.device(device))) for file, (spec, dtype) in files.items()}


def build(out: Path, *, family: str = "bagel", preset: str, seed: int, weights: bool = True,
          device: str | torch.device = "cpu") -> None:
    """Write a BAGEL checkpoint into `out`; `weights=False` leaves out the safetensors files.

    `device` is where the values are drawn (a GPU makes `full` in seconds); files are written from host memory.
    """
    out = Path(out)
    d = PRESETS[preset]
    tok = write_qwen2_tokenizer(out)
    for name, content in configs(d, tok).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    if weights:
        # One file at a time: `full` holds the ~29 GB of ema in host memory while writing it.
        for file, (spec, dtype) in _weight_files(d).items():
            tensors = {name: t.cpu() for name, t in _tensors(spec, seed, dtype, torch.device(device))}
            save_file(tensors, out / file, metadata={"format": "pt"})
