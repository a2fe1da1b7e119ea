"""Sampling parameters and the ONE function that resolves them.

`SamplingParams` is what a caller asks for. Every field defaults to `None`,
which means "unset" -- never a magic number. `resolve()` turns a request into a
`ResolvedParams` with the precedence

    explicit request value  >  stage-config default  >  the pipeline's own default

and then computes derived values (a family's `PipelineDefaults.derive`, e.g. a
second expert's guidance following the first, or an edit's output size from its
input image) from the *resolved* values. Nothing shared is mutated: each call
builds fresh objects.

The fields every model shares are declared here; the fields some families add
(`Family.params`, registry.py) join both dataclasses when this module is first
imported, so `SamplingParams(true_cfg_scale=4.0).true_cfg_scale` reads as any
other field, and no family is named here.

This module imports neither vLLM nor diffusers.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .. import registry
from .capabilities import InvalidParams

OUTPUT_TYPES = ("pil", "np", "latent")
#: at most this many partial images per request (OpenAI's bound for `partial_images`)
MAX_PARTIAL_IMAGES = 3


def partial_steps(num_steps: int, partial_images: int) -> tuple[int, ...]:
    """The steps after which a request's partial images are taken: evenly spaced, none at the last.

    Partial image i (0-based) is decoded after step (i + 1) * N // (k + 1) of N; e.g. 20 steps,
    3 partial images: after steps 5, 10 and 15. The last step makes the completed image, so a
    request of N steps has at most N - 1 partial images (fewer than asked when N <= k, as
    OpenAI's API allows: the final image may come before all partial images).
    """
    k = min(partial_images, max(num_steps - 1, 0))
    return tuple((i + 1) * num_steps // (k + 1) for i in range(k))


#: the request fields families declare (registry.Family.params), name -> Param
FAMILY_PARAMS = registry.params()
#: alias -> the family-declared field it names
_ALIASES = registry.param_aliases()


@dataclass
class _SamplingParams:
    """What a request asks for. `None` everywhere means "not set".

    prompt / negative_prompt  text (a negative prompt switches on true CFG where a
                              model runs it, as in diffusers)
    height, width             output size in pixels
    num_inference_steps       denoising steps
    guidance_scale            CFG scale, or the distilled-guidance input of a
                              guidance-distilled model
    <family params>           the fields families declare (FAMILY_PARAMS), with
                              their aliases as keywords
    seed                      `torch.Generator("cpu").manual_seed(seed)` is handed
                              to the pipeline, exactly as a diffusers user would
    num_outputs_per_prompt    n outputs from one seed, with diffusers' batch
                              semantics (one generator draws the noise of all n)
    num_frames, fps           video length and frame rate
    max_sequence_length       text tokens kept
    images                    input images (edit / layered / image-to-video)
    output_type               "pil" (default), "np" or "latent"
    cache_threshold           step caching (step_cache.py): skip the DiT's later
                              blocks while the first block's residual changes by
                              less than this (relative L1); unset = no caching,
                              0 = caching machinery on but never skipping
    partial_images            0-3: images decoded from the model's estimate of the
                              clean latent (x0) at evenly spaced steps, handed to
                              the caller while the request runs (`partial_steps`);
                              families that declare `Capabilities.partial_images`
    lora                      LoRA adapters and their scales, ((name, scale), ...)
                              (diffusion/lora.py); unset = the base model
    extra                     family-specific knobs (e.g. `cfg_normalize`)
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_outputs_per_prompt: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    max_sequence_length: int | None = None
    images: list[Any] | None = None
    output_type: str | None = None
    cache_threshold: float | None = None
    partial_images: int | None = None
    lora: tuple[tuple[str, float], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self, *alias_values: Any) -> None:
        for alias, value in zip(_ALIASES, alias_values):
            if value is None:
                continue
            name = _ALIASES[alias]
            current = getattr(self, name)
            if current is not None and current != value:
                raise ValueError(
                    f"{alias}={value} and {name}={current} disagree; "
                    f"{alias} is an alias of {name}, pass one of them"
                )
            setattr(self, name, value)
        if self.images is not None and not isinstance(self.images, (list, tuple)):
            self.images = [self.images]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Build from a plain mapping (stage config, JSON body); unknown keys go to `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_ALIASES)
        kwargs = {k: v for k, v in values.items() if k in known and k != "extra"}
        extra = dict(values.get("extra") or {})
        extra.update({k: v for k, v in values.items() if k not in known and k != "extra"})
        return cls(**kwargs, extra=extra)

    def set_fields(self) -> dict[str, Any]:
        """The fields this object sets (value not None), `extra` flattened in."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        out.update({k: v for k, v in self.extra.items() if v is not None})
        return out


#: SamplingParams: the shared fields, then the families' (None = unset), then their aliases
#: (keyword-only InitVars, folded into the field they name)
SamplingParams = dataclasses.make_dataclass(
    "SamplingParams",
    [(name, p.type | None, None) for name, p in FAMILY_PARAMS.items()]
    + [(alias, dataclasses.InitVar[FAMILY_PARAMS[name].type | None], None) for alias, name in _ALIASES.items()],
    bases=(_SamplingParams,),
)
SamplingParams.__doc__, SamplingParams.__module__ = _SamplingParams.__doc__, __name__


@dataclass(frozen=True)
class _ResolvedParams:
    """Every value a pipeline runs with, after resolution. Attached to each output."""

    prompt: str
    negative_prompt: str | None
    height: int | None
    width: int | None
    num_inference_steps: int
    guidance_scale: float | None
    seed: int
    num_outputs_per_prompt: int
    num_frames: int | None
    fps: int | None
    max_sequence_length: int | None
    images: tuple[Any, ...] | None
    output_type: str
    cache_threshold: float | None = None
    partial_images: int = 0
    lora: tuple[tuple[str, float], ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded the way a diffusers user would seed one."""
        return torch.Generator("cpu").manual_seed(self.seed)

    def public_dict(self) -> dict[str, Any]:
        """The resolved values without input images (for logs, responses, outputs)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "images"}
        out["extra"] = dict(self.extra)
        out["lora"] = [{"name": n, "scale": s} for n, s in self.lora] if self.lora else None
        out["num_input_images"] = len(self.images) if self.images else 0
        return out


#: ResolvedParams: the shared fields, then the families' (None: unset or not read)
ResolvedParams = dataclasses.make_dataclass(
    "ResolvedParams", [(name, p.type | None, None) for name, p in FAMILY_PARAMS.items()],
    bases=(_ResolvedParams,), frozen=True,
)
ResolvedParams.__doc__, ResolvedParams.__module__ = _ResolvedParams.__doc__, __name__


# Derivation hook: (values merged by precedence, which names the request/stage set
# explicitly) -> values to overwrite. Supplied per family by its pipeline.
DeriveFn = Callable[[dict[str, Any], frozenset[str]], Mapping[str, Any]]


@dataclass(frozen=True)
class PipelineDefaults:
    """A pipeline family's own defaults and its rule for derived values."""

    values: Mapping[str, Any]
    derive: DeriveFn | None = None


_RESOLVED_FIELDS = tuple(f.name for f in dataclasses.fields(ResolvedParams))


def _layer(source: SamplingParams | Mapping[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, SamplingParams):
        return source.set_fields()
    return SamplingParams.from_dict(source).set_fields()


def resolve(
    request: SamplingParams,
    stage_defaults: SamplingParams | Mapping[str, Any] | None,
    pipeline_defaults: PipelineDefaults,
) -> ResolvedParams:
    """THE resolution: request > stage config > pipeline default; then derived values.

    Returns a new object; `request`, `stage_defaults` and `pipeline_defaults` are
    left untouched (they may be shared between requests).
    """
    explicit_request = _layer(request)
    explicit_stage = _layer(stage_defaults)
    merged: dict[str, Any] = {k: v for k, v in pipeline_defaults.values.items() if v is not None}
    merged.update(explicit_stage)
    merged.update(explicit_request)
    explicit = frozenset(explicit_stage) | frozenset(explicit_request)

    if pipeline_defaults.derive is not None:
        merged.update(pipeline_defaults.derive(dict(merged), explicit))

    if merged.get("seed") is None:
        # An unseeded request still records the seed it ran with, so it can be replayed.
        merged["seed"] = secrets.randbits(63)
    merged.setdefault("num_outputs_per_prompt", 1)
    merged.setdefault("output_type", "pil")
    merged.setdefault("partial_images", 0)
    if merged.get("prompt") is None:
        merged["prompt"] = ""
    _validate(merged)

    extra = {k: v for k, v in merged.items() if k not in _RESOLVED_FIELDS}
    values = {k: merged.get(k) for k in _RESOLVED_FIELDS if k != "extra"}
    if values["images"] is not None:
        values["images"] = tuple(values["images"])
    return ResolvedParams(**values, extra=extra)


def _validate(v: Mapping[str, Any]) -> None:
    def positive_int(name: str) -> None:
        x = v.get(name)
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 1):
            raise InvalidParams(f"{name} must be a positive integer, got {x!r}", name)

    ints = [n for n, p in FAMILY_PARAMS.items() if p.type is int]
    for name in ("height", "width", "num_inference_steps", "num_outputs_per_prompt", "num_frames", "fps", *ints):
        positive_int(name)
    if v.get("num_inference_steps") is None:
        raise InvalidParams("num_inference_steps is unset and the pipeline has no default", "num_inference_steps")
    partial = v["partial_images"]
    if not isinstance(partial, int) or isinstance(partial, bool) or not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise InvalidParams(f"partial_images must be an integer in [0, {MAX_PARTIAL_IMAGES}], got {partial!r}",
                            "partial_images")
    if v["output_type"] not in OUTPUT_TYPES:
        raise InvalidParams(f"output_type must be one of {OUTPUT_TYPES}, got {v['output_type']!r}", "output_type")
    floats = [n for n, p in FAMILY_PARAMS.items() if p.type is float]
    for name in ("guidance_scale", *floats, "cache_threshold"):
        x = v.get(name)
        if x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool)):
            raise InvalidParams(f"{name} must be a number, got {x!r}", name)
    threshold = v.get("cache_threshold")
    if threshold is not None and not 0 <= threshold < float("inf"):
        raise InvalidParams(f"cache_threshold must be a finite number >= 0, got {threshold!r}", "cache_threshold")
    seed = v["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InvalidParams(f"seed must be an integer in [0, 2**64), got {seed!r}", "seed")
