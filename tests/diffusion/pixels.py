"""Pixel comparison helpers of the diffusion tests."""

from __future__ import annotations

import numpy as np
import torch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def to_uint8(x) -> np.ndarray:
    """Decoded output -> uint8 pixels, the way diffusers' numpy_to_pil rounds."""
    arr = np.asarray(x, dtype=np.float32) if not isinstance(x, np.ndarray) else x
    return (arr * 255).round().astype(np.uint8)


def assert_pixels_close(ours, ref, max_diff: int = 0) -> None:
    a, b = to_uint8(ours).astype(int), to_uint8(ref).astype(int)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b).max()
    assert diff <= max_diff, f"uint8 pixels differ by up to {diff} (allowed {max_diff})"
