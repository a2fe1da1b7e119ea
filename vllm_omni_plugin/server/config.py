"""The omni server's settings, read once from the parsed `vllm serve` args."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..request import Limits


class ConfigError(ValueError):
    """A bad omni flag or stage config; the message names the flag and the fix."""


@dataclass(frozen=True)
class OmniServerConfig:
    model: str
    served_model_names: tuple[str, ...]
    limits: Limits
    stage_defaults: dict[str, Any] = field(default_factory=dict)
    max_queue: int = 64
    max_batch_tokens: int = 65536
    video_dir: Path | None = None
    video_retention_s: float = 3600.0
    dtype: str | None = None
    allowed_local_media_path: str = ""
    allowed_media_domains: tuple[str, ...] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OmniServerConfig":
        for flag in ("omni_max_pixels", "omni_max_frames", "omni_max_n", "omni_max_steps", "omni_max_queue"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
        if args.omni_video_retention <= 0:
            raise ConfigError(f"--omni-video-retention must be positive seconds, got {args.omni_video_retention}")
        names = tuple(args.served_model_name or [args.model])
        dtype = None if args.dtype in (None, "auto") else {"float": "float32", "half": "float16"}.get(args.dtype, args.dtype)
        return cls(
            model=args.model,
            served_model_names=names,
            limits=Limits(
                max_pixels=args.omni_max_pixels,
                max_frames=args.omni_max_frames,
                max_n=args.omni_max_n,
                max_steps=args.omni_max_steps,
                max_input_pixels=args.omni_max_input_pixels,
            ),
            stage_defaults=_stage_defaults(args.stage_configs_path, args.default_sampling_params),
            max_queue=args.omni_max_queue,
            max_batch_tokens=args.omni_max_batch_tokens,
            video_dir=Path(args.omni_video_dir) if args.omni_video_dir else None,
            video_retention_s=float(args.omni_video_retention),
            dtype=dtype,
            allowed_local_media_path=args.allowed_local_media_path or "",
            allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        )


def _stage_defaults(stage_configs_path: str | None, default_sampling_params: str | None) -> dict[str, Any]:
    """Stage defaults: the stage config's first stage, then --default-sampling-params on top."""
    defaults: dict[str, Any] = {}
    if stage_configs_path:
        path = Path(stage_configs_path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--stage-configs-path {path}: cannot read it as YAML: {e}") from e
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
            raise ConfigError(f"--stage-configs-path {path}: expected a top-level `stages:` list of mappings")
        stage = stages[0]
        value = stage.get("default_sampling_params") or {}
        if not isinstance(value, dict):
            raise ConfigError(f"--stage-configs-path {path}: stages[0].default_sampling_params must be a mapping")
        defaults.update(value)
    if default_sampling_params:
        try:
            value = json.loads(default_sampling_params)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--default-sampling-params is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ConfigError("--default-sampling-params must be a JSON object")
        defaults.update(value)
    return defaults
