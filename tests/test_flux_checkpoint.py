"""The FLUX.1 checkpoint factory (families/flux/checkpoint.py): the real layout, reproducible, real dimensions.

The tiny checkpoint's pixels are checked against diffusers in tests/diffusion/test_flux.py;
here: what is on disk, that a build is the same bytes in another process, the CLIP tokenizer's
conventions the text encoder relies on, and the `full` preset's parameter counts (meta device).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family,cls", [("flux", "FluxPipeline"), ("flux-kontext", "FluxKontextPipeline")])
def test_layout_is_flux1_dev(checkpoint, family, cls):
    root = checkpoint(family)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == cls
    assert {k: v for k, v in index.items() if not k.startswith("_") and v[0]} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (root / "tokenizer").iterdir()}
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] and scheduler["shift"] == 3.0
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert json.loads((root / "transformer" / "config.json").read_text())["guidance_embeds"] is True


def test_clip_tokenizer_pools_where_clip_expects(checkpoint):
    """FLUX.1-dev's CLIP config keeps the legacy eos_token_id 2: the pooled output is taken at the
    highest token id, which must be <|endoftext|> (as in the real vocabulary, its last entry)."""
    from transformers import CLIPTokenizer

    root = checkpoint("flux")
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["vocab_size"] >= len(tok)
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2 and tok.model_max_length == 77
    ids = tok("A Red cat, sitting on a blue chair!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[1:-1]
    # as openai/clip-vit-large-patch14 decodes: lower-cased, "</w>" (end of word) read back as a space
    assert tok.decode(ids, skip_special_tokens=True) == "a red cat , sitting on a blue chair !"


def test_builds_are_reproducible_across_processes(checkpoint, tmp_path):
    script = ("import sys; from vllm_omni_plugin.checkpoints import make_checkpoint\n"
              "make_checkpoint('flux', 'tiny', sys.argv[1], seed=0)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "flux")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert _digests(tmp_path / "flux") == _digests(checkpoint("flux"))


def test_full_preset_has_the_released_dimensions():
    from vllm_omni_plugin.families.flux.checkpoint import build_in_memory

    pipe = build_in_memory("flux", "full", device="meta")

    def billions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    assert billions(pipe.transformer) == 11.9  # "a 12 billion parameter rectified flow transformer"
    assert billions(pipe.text_encoder_2) == 4.76  # t5-v1_1-xxl encoder
    assert billions(pipe.text_encoder) == 0.12 and billions(pipe.vae) == 0.08  # CLIP-L text, the 16-channel VAE
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * pipe.vae_scale_factor == 1024
