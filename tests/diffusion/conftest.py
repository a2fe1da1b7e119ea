"""Fixtures of the diffusion-engine tests: tiny checkpoints loaded once per session."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_omni_plugin.diffusion import load_pipeline
from vllm_omni_plugin.diffusion.interface import DiffusionPipelineBase

@pytest.fixture(scope="session")
def pipeline(checkpoint) -> Callable[..., DiffusionPipelineBase]:
    """`pipeline("qwen-image")` -> our pipeline on the tiny checkpoint (float32, CPU), loaded once.

    Both variants share the same diffusers pipeline object (one load per family).
    """
    loaded: dict[tuple[str, bool, bool], DiffusionPipelineBase] = {}

    def get(family: str, batch_cfg: bool = True, generic: bool = False) -> DiffusionPipelineBase:
        key = (family, batch_cfg, generic)
        if key not in loaded:
            base = next((p for (f, _, _), p in loaded.items() if f == family), None)
            if base is None:
                p = load_pipeline(checkpoint(family), dtype=torch.float32, device="cpu", batch_cfg=batch_cfg,
                                  force_generic=generic)
            else:
                from vllm_omni_plugin.diffusion.pipelines import wrap

                p = wrap(base.pipe, model_id=base.model_id, force_generic=generic, batch_cfg=batch_cfg)
            loaded[key] = p
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
