"""The omni server's settings, read once from the parsed `vllm serve` args.

Stage configs (`--stage-configs-path`) are read with the orchestrator's
validated schema (`orchestrator/stage_config.py`); a bad file is an error
naming the file, the field and the fix.

Which settings win, highest first:

* diffusion stage defaults: `--default-sampling-params` > the stage config's
  final (diffusion) stage `default_sampling_params` > the pipeline's own;
  request values beat all of them;
* the AR stage's vLLM engine args (multi-stage models): vLLM serve flags given
  on the command line (`--dtype`, `--max-model-len`, `--enforce-eager`,
  `--gpu-memory-utilization`, ... any `AsyncEngineArgs` flag whose value differs
  from vLLM's default) > the stage config's `engine_args` (the file given, else
  the one shipped for the architecture) > vLLM's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs

from ..registry import identify
from ..hub import ModelNotFoundError, resolve_model
from ..diffusion.acceleration import MULTI_STAGE_OPTIONS, DitOptions
from ..diffusion.lora import LoraPolicy
from ..orchestrator.offline import checkpoint_architectures, multistage_config
from ..orchestrator.stage_config import (StageConfig, StageConfigError, builtin_stage_configs, load_stage_config,
                                         with_dit_options)
from ..request import Limits
from .flags import make_parser


class ConfigError(ValueError):
    """A bad omni flag or stage config; the message names the flag and the fix."""


def checkpoint_kind(model: str) -> str:
    """"multi-stage" or "diffusion": what the family registry says the checkpoint is
    (`families.identify`); ConfigError for a directory that is no checkpoint."""
    kind = identify(model).kind
    if kind is None:
        raise ConfigError(f"{model}: neither model_index.json (diffusers) nor config.json (transformers) found")
    return kind


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
    job_store: str | None = None  # --omni-job-store URL (None: a temporary SQLite file)
    dtype: str | None = None
    allowed_local_media_path: str = ""
    allowed_media_domains: tuple[str, ...] | None = None
    #: multi-stage models: the stage config (final stage's defaults already merged with
    #: --default-sampling-params) and the AR engine args given as vLLM serve flags
    stage_config: StageConfig | None = None
    ar_engine_args: dict[str, Any] = field(default_factory=dict)
    #: the diffusion stage's DiT options (flags > the stage config's `dit_options`)
    dit_options: DitOptions = field(default_factory=DitOptions)
    #: per-request LoRA: the operator's policy (None: off) and the --omni-lora adapters
    lora_policy: LoraPolicy | None = None
    loras: tuple[tuple[str, str], ...] = ()
    #: --omni-engine: the diffusion engine (a multi-stage model's DiT stage) in its own process
    engine_process: bool = True

    @property
    def multi_stage(self) -> bool:
        return self.stage_config is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> "OmniServerConfig":
        for flag in ("omni_max_pixels", "omni_max_frames", "omni_max_n", "omni_max_steps", "omni_max_queue"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
        if args.omni_video_retention <= 0:
            raise ConfigError(f"--omni-video-retention must be positive seconds, got {args.omni_video_retention}")
        job_store = getattr(args, "omni_job_store", None)
        if job_store and not job_store.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError(f"--omni-job-store {job_store!r}: write sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
        names = tuple(args.served_model_name or [args.model])  # the id as given, as vLLM names it
        try:
            model = str(resolve_model(args.model, args.revision, args.download_dir))
        except ModelNotFoundError as e:
            raise ConfigError(str(e)) from e
        dtype = None if args.dtype in (None, "auto") else {"float": "float32", "half": "float16"}.get(args.dtype, args.dtype)
        overrides = _json_defaults(args.default_sampling_params)
        stage_config, stage_defaults, ar_engine_args, dit_options = None, dict(overrides), {}, {}
        if checkpoint_kind(model) == "multi-stage":
            stage_config = _multistage_config(model, args.stage_configs_path, overrides)
            ar_engine_args = explicit_engine_args(args, parser)
            stage_defaults = dict(_final_stage(stage_config, args.stage_configs_path).default_sampling_params)
        elif args.stage_configs_path:
            config = _load(args.stage_configs_path)
            stage_defaults = {**_final_stage(config, args.stage_configs_path).default_sampling_params, **overrides}
            dit_options = dict(_final_stage(config, args.stage_configs_path).dit_options)
        if stage_config is not None:
            dit_options = dict(_final_stage(stage_config, args.stage_configs_path).dit_options)
        dit = _dit_options(args, dit_options, multi_stage=stage_config is not None)
        if stage_config is not None:  # the multi-stage DiT stage applies them itself (StageOrchestrator)
            stage_config = with_dit_options(stage_config, dit.multi_stage_values())
        lora_policy, loras = _lora_flags(args, multi_stage=stage_config is not None, parallel=dit.parallel.world_size > 1)
        return cls(
            model=model,
            served_model_names=names,
            limits=Limits(
                max_pixels=args.omni_max_pixels,
                max_frames=args.omni_max_frames,
                max_n=args.omni_max_n,
                max_steps=args.omni_max_steps,
                max_input_pixels=args.omni_max_input_pixels,
            ),
            stage_defaults=stage_defaults,
            max_queue=args.omni_max_queue,
            max_batch_tokens=args.omni_max_batch_tokens,
            video_dir=Path(args.omni_video_dir) if args.omni_video_dir else None,
            video_retention_s=float(args.omni_video_retention),
            job_store=job_store,
            dtype=dtype,
            allowed_local_media_path=args.allowed_local_media_path or "",
            allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
            stage_config=stage_config,
            ar_engine_args=ar_engine_args,
            dit_options=dit,
            lora_policy=lora_policy,
            loras=loras,
            engine_process=getattr(args, "omni_engine", "process") != "thread",
        )


_DIT_FLAGS = {
    "cfg_degree": "omni_cfg_parallel_size",
    "ulysses_degree": "omni_ulysses_degree",
    "ring_degree": "omni_ring_degree",
    "quantization": "omni_dit_quantization",
    "compile": "omni_dit_compile",
    "attention_mode": "omni_dit_attention_mode",
    "cuda_graphs": "omni_dit_cuda_graphs",
    "cuda_graph_max": "omni_dit_cuda_graph_max",
}


def _dit_options(args: argparse.Namespace, from_stage: dict[str, Any], multi_stage: bool) -> DitOptions:
    """The DiT options: --omni-* flags over the stage config's final-stage `dit_options`."""
    flags = {key: getattr(args, dest, None) for key, dest in _DIT_FLAGS.items()}
    values = {**from_stage, **{k: v for k, v in flags.items() if v is not None}}
    unsupported = [k for k in values if k not in MULTI_STAGE_OPTIONS]
    if not multi_stage and values.get("attention_mode", "auto") != "auto":
        raise ConfigError("--omni-dit-attention-mode / attention_mode: only BAGEL's DiT stage takes it; a diffusers "
                          "checkpoint attends through diffusers")
    if unsupported and multi_stage:
        given = ", ".join(f"--{_DIT_FLAGS[k].replace('_', '-')}" if k in _DIT_FLAGS else k for k in unsupported)
        raise ConfigError(f"{given}: sequence parallelism / fp8 / CUDA graphs apply to diffusers checkpoints, "
                          f"not multi-stage ones (their diffusion stage takes {', '.join(sorted(MULTI_STAGE_OPTIONS))})")
    try:
        return DitOptions.from_dict(values)
    except ValueError as e:
        given = ", ".join(f"--{_DIT_FLAGS[k]}".replace("_", "-") if k in _DIT_FLAGS else k for k in values)
        raise ConfigError(f"DiT options ({given}): {e}") from e


def _lora_flags(args: argparse.Namespace, multi_stage: bool,
                parallel: bool) -> tuple[LoraPolicy | None, tuple[tuple[str, str], ...]]:
    """--omni-lora NAME=PATH / --omni-lora-dirs / --omni-max-loras / --omni-max-lora-bytes."""
    specs, dirs = list(getattr(args, "omni_lora", None) or []), list(getattr(args, "omni_lora_dirs", None) or [])
    if not specs and not dirs:
        return None, ()
    if multi_stage or parallel:
        what = "multi-stage models" if multi_stage else "a multi-GPU DiT"
        raise ConfigError(f"--omni-lora / --omni-lora-dirs: per-request LoRA is not served for {what} (yet)")
    loras: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--omni-lora {spec!r}: write NAME=PATH")
        if name in {n for n, _ in loras} or name in (args.served_model_name or [args.model]):
            raise ConfigError(f"--omni-lora {spec!r}: the name {name!r} is already taken")
        loras.append((name, path))
    for d in dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"--omni-lora-dirs {d!r}: no such directory")
    if args.omni_max_loras < 1 or args.omni_max_loras < len(loras):
        raise ConfigError(f"--omni-max-loras {args.omni_max_loras}: must be at least 1 and the number of --omni-lora "
                          f"adapters ({len(loras)})")
    if args.omni_max_lora_bytes < 1:
        raise ConfigError(f"--omni-max-lora-bytes must be positive, got {args.omni_max_lora_bytes}")
    policy = LoraPolicy(allowed_dirs=tuple(dirs), max_loras=args.omni_max_loras, max_bytes=args.omni_max_lora_bytes)
    return policy, tuple(loras)


def _load(path: str) -> StageConfig:
    try:
        return load_stage_config(path)
    except StageConfigError as e:
        raise ConfigError(f"--stage-configs-path: {e}") from e


def _final_stage(config: StageConfig, source: str | None):
    stage = config.final_stage
    if stage.type != "diffusion":
        where = source or f"the shipped stage config {config.name!r}"
        raise ConfigError(f"{where}: the final stage {stage.id!r} must be of type diffusion for `vllm serve --omni`")
    return stage


def _multistage_config(model: str, path: str | None, overrides: dict[str, Any]) -> StageConfig:
    """The stage config of a multi-stage checkpoint, --default-sampling-params merged into its final stage."""
    try:
        config = multistage_config(model, path)
    except StageConfigError as e:
        raise ConfigError(f"--stage-configs-path: {e}") from e
    if config is None:
        if path:
            raise ConfigError(f"--stage-configs-path {path}: it has a single stage; a multi-stage checkpoint needs two or more")
        archs = ", ".join(checkpoint_architectures(model)) or "none"
        known = ", ".join(sorted({a for c in builtin_stage_configs().values() for a in c.architectures}))
        raise ConfigError(
            f"{model}: not a checkpoint `--omni` serves: no model_index.json (a diffusers pipeline), and its "
            f"config.json names architectures [{archs}], none with a stage config (shipped for: {known}); serve "
            "a transformers model with plain `vllm serve`, or give its stages with --stage-configs-path"
        )
    final = _final_stage(config, path)
    if not overrides:
        return config
    merged = final.model_copy(update={"default_sampling_params": {**final.default_sampling_params, **overrides}})
    return config.model_copy(update={"stages": tuple(merged if s.id == final.id else s for s in config.stages)})


# Flags of vLLM's serve parser that are not engine settings of the AR stage
# (--revision / --download-dir were used to resolve the model to a local directory).
_NOT_AR_ENGINE_ARGS = frozenset({"model", "logging_config", "log_config_file", "revision", "download_dir"})


def explicit_engine_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """vLLM engine args set on the command line: every `AsyncEngineArgs` field whose parsed value
    differs from the serve parser's default (a flag given with its default value is indistinguishable
    from an omitted one, and leaves the stage config's value in place)."""
    if parser is None:
        parser = make_parser()
    out = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        if f.name in _NOT_AR_ENGINE_ARGS or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value != parser.get_default(f.name):
            out[f.name] = value
    return out


def _json_defaults(default_sampling_params: str | None) -> dict[str, Any]:
    if not default_sampling_params:
        return {}
    try:
        value = json.loads(default_sampling_params)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--default-sampling-params is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError("--default-sampling-params must be a JSON object")
    return value
