"""Processors the diffusion loader builds itself where this environment cannot load the real class.

Qwen-Image-Edit and Qwen-Image-Layered checkpoints name `Qwen2VLProcessor` for
their `processor/` folder. transformers 5 cannot construct or load a
Qwen2VLProcessor without torchvision (its video processor needs it, and the CPU
build of torch has no matching torchvision on PyPI). The Qwen-Image pipelines
only pass images, so `Qwen2VLImageOnlyProcessor`, which loads the image
processor and tokenizer from the same folder, behaves identically for them.

Runtime code (the loader); the checkpoint factory imports `load_processor` from here.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2VLProcessor
from transformers.utils import is_torchvision_available


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video half, for environments without torchvision."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_processor(folder: str | Path) -> Qwen2VLProcessor:
    """The processor of a Qwen-Image-Edit/Layered checkpoint: the real class where torchvision allows."""
    cls = Qwen2VLProcessor if is_torchvision_available() else Qwen2VLImageOnlyProcessor
    return cls.from_pretrained(folder)
