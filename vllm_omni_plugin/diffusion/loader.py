"""Load a diffusers-format checkpoint directory: model_index.json -> components.

The path a real checkpoint takes: model_index.json names the pipeline class and
each component's (library, class); diffusers' `from_pretrained` instantiates
those classes from their sub-folders. dtype and device are explicit: nothing is
guessed inside the pipelines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .interface import DiffusionPipelineBase
from .pipelines import wrap


@dataclass(frozen=True)
class LoadConfig:
    dtype: torch.dtype
    device: torch.device


def default_load_config(dtype: torch.dtype | str | None = None, device: str | torch.device | None = None) -> LoadConfig:
    """float32 on CPU, bfloat16 on CUDA unless given."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return LoadConfig(dtype=dtype, device=dev)


def read_model_index(path: str | Path) -> dict[str, Any]:
    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory (a diffusers checkpoint is a directory with model_index.json)")
    if not index.is_file():
        found = "config.json (a transformers model, not a diffusers pipeline)" if (Path(path) / "config.json").is_file() else "neither it nor config.json"
        raise FileNotFoundError(f"{path} is not a diffusers checkpoint: no model_index.json (found {found})")
    return json.loads(index.read_text())


def check_component_weights(path: str | Path, model_index: dict[str, Any]) -> None:
    """Every model component (a sub-folder with config.json) has its weight files, before diffusers looks.

    diffusers reports a missing `*.safetensors` as a missing `diffusion_pytorch_model.bin`
    (its fallback), which sends the reader after the wrong file. Checked here: the
    folder has a `*.safetensors` (or `.bin`) file, and a sharded index's shards all exist.
    """
    for name, spec in model_index.items():
        folder = Path(path) / name
        if name.startswith("_") or not isinstance(spec, list) or not (folder / "config.json").is_file():
            continue  # metadata, or a component without weights (scheduler, tokenizer, processor)
        for index in folder.glob("*.safetensors.index.json"):
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: {index.name} lists weight shards that are missing: {', '.join(missing)}")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise FileNotFoundError(
                f"{folder}: component {name!r} ({'.'.join(map(str, spec))}) has config.json but no weights "
                "(looked for *.safetensors, *.safetensors.index.json shards, *.bin)")


def pipeline_class(model_index: dict[str, Any]) -> type:
    import diffusers

    name = model_index.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"model_index.json names pipeline class {name!r}, which diffusers {diffusers.__version__} lacks")
    return cls


def _component_overrides(path: Path, model_index: dict[str, Any]) -> dict[str, Any]:
    """Components this environment cannot load through their own class, loaded another way.

    Qwen2VLProcessor (Qwen-Image-Edit/Layered `processor/`) needs torchvision for
    its video half in transformers 5; without torchvision its image + tokenizer
    half is loaded from the same folder (the pipelines only pass images).
    """
    from transformers.utils import is_torchvision_available

    overrides: dict[str, Any] = {}
    if list(model_index.get("processor") or []) == ["transformers", "Qwen2VLProcessor"] and not is_torchvision_available():
        from .processors import load_processor

        overrides["processor"] = load_processor(path / "processor")
    return overrides


def load_diffusers_pipeline(path: str | Path, config: LoadConfig) -> Any:
    """The diffusers pipeline object, on `config.device` in `config.dtype`."""
    model_index = read_model_index(path)
    check_component_weights(path, model_index)
    cls = pipeline_class(model_index)
    overrides = _component_overrides(Path(path), model_index)
    pipe = cls.from_pretrained(str(path), dtype=config.dtype, **overrides)
    pipe.to(config.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    force_generic: bool = False,
    batch_cfg: bool = True,
) -> DiffusionPipelineBase:
    """Load `path` and wrap it in its step-wise implementation (or the generic one).

    batch_cfg: run CFG's cond and uncond rows in one forward (faster on a GPU;
    float results then differ from diffusers' two forwards by rounding only).
    """
    config = default_load_config(dtype, device)
    pipe = load_diffusers_pipeline(path, config)
    return wrap(pipe, model_id=str(path), force_generic=force_generic, batch_cfg=batch_cfg)
