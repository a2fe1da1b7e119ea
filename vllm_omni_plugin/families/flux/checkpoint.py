"""FLUX.1 checkpoints in the black-forest-labs/FLUX.1-dev (and -Kontext-dev) on-disk layout.

    model_index.json   FluxPipeline | FluxKontextPipeline
    scheduler/         FlowMatchEulerDiscreteScheduler, use_dynamic_shifting (mu from the image size)
    text_encoder/      CLIPTextModel (openai/clip-vit-large-patch14's text tower: pooled output only)
    tokenizer/         CLIPTokenizer (vocab.json + merges.txt, 77 tokens)
    text_encoder_2/    T5EncoderModel (google/t5-v1_1-xxl's encoder)
    tokenizer_2/       T5TokenizerFast (unigram, 512 tokens, 100 sentinels)
    transformer/       FluxTransformer2DModel (guidance-distilled: guidance_embeds)
    vae/               AutoencoderKL, 16 latent channels, no quant convs, scaling 0.3611 / shift 0.1159

`full` uses the dimensions of the published configs (FLUX.1-dev: 19 double + 38 single blocks,
24 heads x 128, T5 d_model 4096, CLIP hidden 768, VAE 128-256-512-512); `tiny` keeps every
structural choice (4 VAE levels: the real scale factor 8, so diffusers' default size is the
real 1024x1024; the rotary split 1:3.5:3.5 of the head; CLIP's legacy eos_token_id 2, which
pools at the highest token id) with widths of a few dozen.

Tokenizers are built locally (no hub): the T5 one by checkpoints/tokenizers.py, the CLIP one
here, the same class, normalizer and pre-tokenizer as openai/clip-vit-large-patch14's with a
BPE vocabulary learnt from that module's corpus.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, models, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from ...checkpoints.weights import SAVE_DTYPE, random_model
from ...checkpoints.tokenizers import CORPUS, T5_MODEL_VOCAB, write_t5_tokenizer

PIPELINES = {"flux": FluxPipeline, "flux-kontext": FluxKontextPipeline}

# FLUX.1-dev scheduler/scheduler_config.json (FLUX.1-schnell: shift 1.0, no dynamic shifting).
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)  # fmt: skip

TRANSFORMER = {
    "full": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14)),
}  # fmt: skip

# FLUX.1-dev vae/config.json
VAE_COMMON = dict(in_channels=3, out_channels=3, latent_channels=16, act_fn="silu", sample_size=1024,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=True, force_upcast=True)  # fmt: skip
VAE = {
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
}

# openai/clip-vit-large-patch14 text tower as FLUX.1-dev's text_encoder/config.json has it
# (bos 0 / eos 2 / pad 1 are that config's legacy ids: pooling takes the highest token id).
CLIP = {
    "full": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, projection_dim=768),
    "tiny": dict(vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=32),
}  # fmt: skip
CLIP_COMMON = dict(hidden_act="quick_gelu", max_position_embeddings=77, layer_norm_eps=1e-5,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip

# google/t5-v1_1-xxl, as FLUX.1-dev's text_encoder_2/config.json
T5 = {
    "full": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24),
    "tiny": dict(vocab_size=T5_MODEL_VOCAB, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2),
}
T5_COMMON = dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip

CLIP_BPE_VOCAB = 600  # learnt tokens (bytes, bytes + "</w>", merges), before <|startoftext|> <|endoftext|>


def clip_tokenizer() -> CLIPTokenizer:
    """openai/clip-vit-large-patch14's tokenizer class and text pipeline with a small learnt vocabulary.

    As in the real vocab.json: the byte alphabet, then every byte with the end-of-word
    marker "</w>", then the merges, and <|startoftext|>, <|endoftext|> as the last two ids.
    BPE training in `tokenizers` is deterministic: the same files every time.
    """
    template = CLIPTokenizer()  # the real normalizer and pre-tokenizer, empty vocabulary
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = template.backend_tokenizer.normalizer
    tok.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    # The trainer numbers each "x</w>" piece as it first meets it in a (randomly ordered) hash
    # map, and equal-count merges are ranked by those numbers: given up front as special
    # tokens, they have fixed numbers and the training is the same in every process.
    bytes_ = _byte_alphabet()
    words_end = [b + "</w>" for b in bytes_]
    trainer = trainers.BpeTrainer(vocab_size=CLIP_BPE_VOCAB + len(words_end), initial_alphabet=bytes_,
                                  special_tokens=words_end, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    learnt = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    order = bytes_ + words_end + [t for t, _ in learnt if t not in set(bytes_) | set(words_end)]
    vocab = {t: i for i, t in enumerate(order)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_clip_tokenizer(out: Path) -> PreTrainedTokenizerBase:
    """tokenizer/ as FLUX.1-dev has it (vocab.json, merges.txt, tokenizer_config.json, special tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer()
    tok.save_pretrained(out)
    vocab = tok.get_vocab()
    (out / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))) + "\n")
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return CLIPTokenizer.from_pretrained(out)


def build_in_memory(
    family: str, preset: str = "full", seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> DiffusionPipeline:
    """The pipeline object with seeded random weights on `device` in `dtype` (nothing kept on disk)."""
    model = partial(random_model, seed=seed, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_2 = write_t5_tokenizer(Path(tmp) / "tokenizer_2")
    clip = dict(CLIP[preset], **CLIP_COMMON)
    clip["vocab_size"] = clip["vocab_size"] or len(tokenizer)
    clip_config = CLIPTextConfig(**clip)
    clip_config.architectures = ["CLIPTextModel"]
    t5_config = T5Config(**T5[preset], **T5_COMMON)
    t5_config.architectures = ["T5EncoderModel"]
    return PIPELINES[family](
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=model(lambda: AutoencoderKL(**VAE[preset], **VAE_COMMON), component="vae"),
        text_encoder=model(lambda: CLIPTextModel(clip_config), component="text_encoder"),
        tokenizer=tokenizer,
        text_encoder_2=model(lambda: T5EncoderModel(t5_config), component="text_encoder_2"),
        tokenizer_2=tokenizer_2,
        transformer=model(lambda: FluxTransformer2DModel(**TRANSFORMER[preset], guidance_embeds=True),
                          component="transformer"),
    )


def build(out: Path, *, family: str, preset: str, seed: int) -> None:
    """Write a `family` ("flux" | "flux-kontext") checkpoint of `preset` size into `out`."""
    pipe = build_in_memory(family, preset, seed, SAVE_DTYPE[preset])
    pipe.save_pretrained(out)
    write_clip_tokenizer(out / "tokenizer")  # the real folder's vocab.json + merges.txt beside tokenizer.json
    # transformers 5 saves T5TokenizerFast under its merged name; the real model_index names the fast class
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
