"""Checkpoint factory: seeded random checkpoints in each family's real on-disk format.

No model hub is reachable where tests and CI run, so every test builds its
weights here. Each family module writes exactly the directory layout the real
checkpoint has (HF / diffusers folders, safetensors, config.json /
model_index.json, tokenizer and processor files), and the code that reads them
back is the loader real checkpoints go through.

Presets:
  tiny  small dimensions, runs on a CPU in seconds (head_dim >= 64 wherever the
        vLLM CPU attention kernels see it)
  full  the real architecture dimensions with random weights, for GPU
        benchmarks; `build_in_memory` can skip the disk.

The same (family, preset, seed) gives the same bytes on the same device.
`device="cuda"` (bagel, qwen-image*, glm-image) draws the weights on the GPU: a `full`
checkpoint is then written in seconds instead of minutes of CPU sampling.

This module must not import vLLM: the GPU benchmark machine has none.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = ("tiny", "full")

def checkpoint_names() -> list[str]:
    """Every name `make_checkpoint` builds (declared by the families, `Family.checkpoints`)."""
    from ..families import checkpoint_builders

    return sorted(checkpoint_builders())


def device_checkpoint_names() -> list[str]:
    """The names whose builder can draw the weights on another device than the CPU."""
    from ..families import families

    return sorted(n for fam in families().values() for n in fam.device_checkpoints)


def make_checkpoint(family: str, preset: str, out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write a `family` checkpoint of `preset` size into `out` and return the path.

    Args:
        device: where the random weights are drawn ("cpu", or "cuda" for `device_checkpoint_names()`);
            the files are the same format either way, the values differ between devices.
    """
    from ..families import checkpoint_builders

    builders = checkpoint_builders()
    if family not in builders:
        raise ValueError(f"unknown checkpoint family {family!r}; known: {', '.join(sorted(builders))}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if device != "cpu" and family not in device_checkpoint_names():
        raise ValueError(f"family {family!r} draws its weights on the CPU only; --device works for "
                         f"{', '.join(device_checkpoint_names())}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build = builders[family].load(builders[family].checkpoints[family])
    build(out, family=family, preset=preset, seed=seed, **({"device": device} if device != "cpu" else {}))
    return out


def cached_checkpoint(family: str, preset: str, root: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """`root/<family>-<preset>-<seed>`, built by `make_checkpoint` unless a finished build is there.

    A `.done` marker is written last, so an interrupted build is rebuilt, never half-read.
    """
    out = Path(root) / f"{family}-{preset}-{seed}"
    done = out / ".done"
    if not done.exists():
        make_checkpoint(family, preset, out, seed=seed, device=device)
        done.touch()
    return out
