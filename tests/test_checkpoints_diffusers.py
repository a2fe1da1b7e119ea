"""The checkpoint factory for the diffusers families.

Every tiny checkpoint goes through the real loader (`DiffusionPipeline.from_pretrained`)
and a 2-step call; builds are byte-for-byte reproducible, across processes too;
`full` has the released models' dimensions (checked on the meta device, no memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FAMILIES = ["qwen-image", "qwen-image-edit", "qwen-image-layered", "wan2.2-t2v", "wan2.2-i2v", "glm-image"]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path):
    from diffusers import DiffusionPipeline

    extra = {}
    if (path / "processor" / "video_preprocessor_config.json").exists():  # Qwen2VLProcessor: needs torchvision
        from vllm_omni_plugin.families.qwen_image.checkpoint import load_processor

        extra["processor"] = load_processor(path / "processor")
    return DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **extra)


def _image(mode: str = "RGB", size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


# family -> (call kwargs, expected output shape); 64x64 (Layered picks its own 640 bucket).
CALLS = {
    "qwen-image": (dict(height=64, width=96), (1, 64, 96, 3)),
    "qwen-image-edit": (dict(image=_image(), height=64, width=64), (1, 64, 64, 3)),
    "qwen-image-layered": (dict(image=_image("RGBA"), layers=1, resolution=640), (1, 1, 640, 640, 4)),
    "wan2.2-t2v": (dict(height=64, width=64, num_frames=5), (1, 5, 64, 64, 3)),
    "wan2.2-i2v": (dict(image=_image(), height=64, width=64, num_frames=5), (1, 5, 64, 64, 3)),
    "glm-image": (dict(height=64, width=64), (1, 64, 64, 3)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_runs_through_the_diffusers_loader(checkpoint, family):
    pipe = _load(checkpoint(family))
    kwargs, shape = CALLS[family]
    out = pipe(
        prompt='a red cat holding a sign that says "hi"',
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    )
    pixels = np.stack(out.images) if hasattr(out, "images") else out.frames
    pixels = np.asarray(pixels, dtype=np.float32)
    assert pixels.shape == shape
    assert np.isfinite(pixels).all()
    assert pixels.std() > 0.02, "degenerate (near-constant) output"


def test_builds_are_reproducible_across_processes(checkpoint, tmp_path):
    # A fresh interpreter with another hash seed: catches set/dict-order leaks into the files.
    script = (
        "import sys; from vllm_omni_plugin.checkpoints import make_checkpoint\n"
        "for fam in sys.argv[2:]:\n"
        "    make_checkpoint(fam, 'tiny', f'{sys.argv[1]}/{fam}', seed=0)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *FAMILIES], check=True, env=env)
    for family in FAMILIES:
        assert _digests(tmp_path / family) == _digests(checkpoint(family)), family


@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-i2v", "glm-image"])
def test_another_seed_gives_other_weights(checkpoint, family):
    a, b = _digests(checkpoint(family, seed=0)), _digests(checkpoint(family, seed=1))
    assert a.keys() == b.keys()
    for name in a:
        same = a[name] == b[name]
        assert same != name.endswith(".safetensors"), name  # weights differ, everything else is identical


def test_qwen2_tokenizer(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from vllm_omni_plugin.checkpoints.tokenizers import QWEN2_MODEL_VOCAB, write_qwen2_tokenizer

    tok = write_qwen2_tokenizer(tmp_path, extra_special_tokens=["<|extra|>"])
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "Qwen2Tokenizer"
    text = "A red cat, café 東京 🐱\n  spaces"
    assert tok.decode(tok(text).input_ids) == text
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"])
    assert ids[:3] == [ids[0], ids[0] + 1, ids[0] + 2] and len(tok) <= QWEN2_MODEL_VOCAB
    assert tok.convert_tokens_to_ids("<|extra|>") == len(tok) - 1
    # As with the real tokenizer, the pipelines' system prefixes are exactly as many tokens as they drop.
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    for cls in (QwenImagePipeline, QwenImageEditPipeline):
        template, drop = _template_of(cls)
        prefix = template.split("{}")[0].split("<|vision_start|>")[0]
        assert len(tok(prefix).input_ids) == drop, cls.__name__
    # The checkpoint's text encoder uses the tokenizer's ids.
    config = json.loads((checkpoint("qwen-image") / "text_encoder" / "config.json").read_text())
    saved = AutoTokenizer.from_pretrained(checkpoint("qwen-image") / "tokenizer")
    assert config["image_token_id"] == saved.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == saved.convert_tokens_to_ids("<|vision_start|>")
    assert config["text_config"]["vocab_size"] >= len(saved)


def _template_of(cls) -> tuple[str, int]:
    """(prompt_template_encode, prompt_template_encode_start_idx) as the pipeline sets them in __init__."""
    import inspect
    import re

    source = inspect.getsource(cls.__init__)
    template = re.search(r'self\.prompt_template_encode = "(.*)"', source).group(1)
    start = int(re.search(r"self\.prompt_template_encode_start_idx = (\d+)", source).group(1))
    return template.encode().decode("unicode_escape"), start


def test_t5_and_glm_tokenizers(checkpoint):
    from transformers import AutoTokenizer

    t5 = AutoTokenizer.from_pretrained(checkpoint("wan2.2-t2v") / "tokenizer")
    ids = t5("A red cat sitting in the sun").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == "A red cat sitting in the sun"

    glm = AutoTokenizer.from_pretrained(checkpoint("glm-image") / "processor")
    ar_config = json.loads((checkpoint("glm-image") / "vision_language_encoder" / "config.json").read_text())
    assert glm.bos_token_id == ar_config["image_start_token_id"] == ar_config["text_config"]["vision_vocab_size"]
    assert glm.eos_token_id == ar_config["image_end_token_id"]
    assert glm.convert_tokens_to_ids(glm.image_token) == ar_config["image_token_id"]
    assert glm.decode(glm("a red cat").input_ids) == "a red cat"


def test_full_preset_has_the_released_dimensions():
    from vllm_omni_plugin.families.glm_image import checkpoint as glm_image
    from vllm_omni_plugin.families.qwen_image import checkpoint as qwen_image
    from vllm_omni_plugin.families.wan import checkpoint as wan

    def billions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    qwen = qwen_image.build_in_memory("qwen-image", "full", device="meta", with_processor=False)
    assert billions(qwen.transformer) == 20.43  # "our 20B Qwen-Image model"
    assert billions(qwen.text_encoder) == 8.29  # Qwen2.5-VL-7B-Instruct
    wan22 = wan.build_in_memory("wan2.2-t2v", "full", device="meta")
    assert billions(wan22.transformer) == billions(wan22.transformer_2) == 14.29  # A14B: two 14B experts
    assert billions(wan22.text_encoder) == 5.68  # umt5-xxl encoder
    glm = glm_image.build_in_memory("glm-image", "full", device="meta")
    assert billions(glm.transformer) == 6.93 and billions(glm.text_encoder) == 0.22
