"""What a pipeline family declares about itself (ARCHITECTURE.md, principle 9).

Each pipeline class carries a `capabilities` class attribute, next to its
code, the way diffusers pipelines declare `_callback_tensor_inputs`:

    class QwenImageEditPlusStepwise(QwenImageEditStepwise):
        capabilities = Capabilities(
            output="image",
            input_images=(1, None),                      # one or more
            fields=QWEN_FIELDS,                          # SamplingParams fields it reads
        )

The request builder, the server and `Omni` read this declaration and nothing
else to decide what a model makes, how many images it takes and which request
fields mean something to it. A field a model does not read is refused (or,
where OpenAI clients send it anyway, reported as ignored) -- never silently
dropped.

Pipelines whose honoured fields depend on the loaded checkpoint (a
guidance-distilled checkpoint reads `guidance_scale`; a checkpoint with one
expert has no second expert's guidance) refine the class declaration per instance in
`__init__` with `Capabilities.with_fields` / `without_fields`.

This module imports neither vLLM nor diffusers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .. import registry

OUTPUT_KINDS = ("image", "layers", "video")

#: SamplingParams fields every pipeline reads: nothing to declare for them.
# cache_threshold (step caching) is the engine's: a family that cannot cache refuses it by
# its `supports_step_cache` class attribute, with a message that says so (interface.resolve).
ALWAYS_HONOURED = frozenset({"prompt", "seed", "num_outputs_per_prompt", "output_type", "cache_threshold"})

#: SamplingParams fields a family may declare (`images` is declared through `input_images`): the
#: shared ones and those families add (registry.Family.params).
DECLARABLE_FIELDS = frozenset({
    "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "num_frames", "fps",
    "max_sequence_length", *registry.params(),
})

#: Knob types a family may declare: JSON-representable values a request can carry.
KNOB_TYPES = (bool, int, float, str, tuple)


#: what the background of a family's outputs is: opaque (RGB) or transparent (RGBA)
BACKGROUNDS = ("opaque", "transparent")


class InvalidParams(ValueError):
    """A request's parameters are wrong for this pipeline (a missing input image, a resolution it
    has no bucket for ...): the caller's mistake, a 400 on a server.

    Raised by a pipeline's `resolve` (and the shared rules it applies); anything else a pipeline
    raises is its own failure (a 500). `field` names the offending field where one is known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedField(InvalidParams):
    """A request sets a field the served model does not read.

    `field` names it (the wire name where it has one), so a server can point at it.
    """

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field)


@dataclass(frozen=True)
class Knob:
    """A family's own request field (travels in `SamplingParams.extra`).

    type         bool | int | float | str | tuple (a fixed-length list of numbers)
    length       for tuples: how many numbers
    description  what it does, for the server's OpenAPI document
    """

    type: type
    length: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in KNOB_TYPES:
            raise TypeError(f"a knob's type must be one of {KNOB_TYPES}, got {self.type!r}")
        if (self.type is tuple) != (self.length is not None):
            raise TypeError("a tuple knob declares its length (and only a tuple knob does)")


@dataclass(frozen=True)
class Capabilities:
    """What one pipeline family makes, takes and reads.

    output         "image" | "layers" (RGBA layers per output) | "video"
    input_images   (min, max) input images; max None = any number.
                   (0, 0) text-to-X, (1, 1) one image, (1, None) several
    fields         SamplingParams fields it reads besides ALWAYS_HONOURED
    knobs          its own request fields, name -> Knob (their values go in `extra`)
    text_output    it also answers in text (a multi-stage model with an AR stage)
    orchestrator   multi-stage families: the family whose orchestrator runs them
                   (reported in /v1/models; the class is the family's declaration,
                   `Family.orchestrator`, vllm_omni_plugin/families/); None: the
                   pipeline runs inline in one diffusion engine
    background     what its outputs' background is: "opaque" (RGB) or "transparent"
                   (RGBA); a request asking for the other one is refused
    partial_images it can hand out partial images while a request runs (streaming):
                   its step-wise pipeline implements `x0_estimate` (the model's
                   current estimate of the clean latent) and `decode_partial` (that
                   estimate through the family's own VAE); a request asking for
                   partial images from a family that cannot is refused, naming it
    """

    output: str
    input_images: tuple[int, int | None] = (0, 0)
    fields: frozenset[str] = frozenset()
    knobs: Mapping[str, Knob] = field(default_factory=dict)
    text_output: bool = False
    orchestrator: str | None = None
    background: str = "opaque"
    partial_images: bool = False

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        low, high = self.input_images
        if low < 0 or (high is not None and high < low):
            raise ValueError(f"input_images must be (min, max) with 0 <= min <= max, got {self.input_images!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        unknown = set(self.fields) - DECLARABLE_FIELDS
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s) declared: {sorted(unknown)}")
        object.__setattr__(self, "fields", frozenset(self.fields))
        object.__setattr__(self, "knobs", dict(self.knobs))

    # ---- reading ---------------------------------------------------------------
    @property
    def takes_images(self) -> bool:
        return self.input_images[1] != 0

    @property
    def honoured(self) -> frozenset[str]:
        """Every SamplingParams field (and knob) a request may set for this family."""
        return (self.fields | ALWAYS_HONOURED | frozenset(self.knobs) | ({"images"} if self.takes_images else set())
                | ({"partial_images"} if self.partial_images else set()))

    def describe_images(self) -> str:
        low, high = self.input_images
        if high == 0:
            return "no input image"
        if high is None:
            return f"at least {low} input image{'s' if low != 1 else ''}"
        if low == high:
            return f"exactly {low} input image{'s' if low != 1 else ''}"
        if low == 0:
            return f"at most {high} input image{'s' if high != 1 else ''}"
        return f"{low} to {high} input images"

    # ---- checking ----------------------------------------------------------------
    def check_images(self, count: int) -> None:
        """Raise UnsupportedField("images") unless `count` input images fit the declaration."""
        low, high = self.input_images
        if count < low or (high is not None and count > high):
            raise UnsupportedField(f"this model takes {self.describe_images()}, got {count}", "images")

    def check_fields(self, names: Iterable[str], source: str = "request") -> None:
        """Raise UnsupportedField for the first name (sorted) this family does not read."""
        unread = sorted(n for n in names if n not in self.honoured)
        if unread:
            raise UnsupportedField(
                f"{source}: `{unread[0]}` is not used by this model "
                f"(it reads: {', '.join(sorted(self.honoured - {'images', 'output_type'}))})",
                unread[0],
            )

    # ---- refining per instance -----------------------------------------------------
    def with_fields(self, *names: str) -> "Capabilities":
        return dataclasses.replace(self, fields=self.fields | frozenset(names))

    def without_fields(self, *names: str) -> "Capabilities":
        return dataclasses.replace(self, fields=self.fields - frozenset(names))

    def as_json(self) -> dict[str, Any]:
        """The declaration as plain JSON (for /v1/models and logs)."""
        low, high = self.input_images
        return {
            "output": self.output,
            "input_images": {"min": low, "max": high},
            "fields": sorted(self.fields | ALWAYS_HONOURED - {"output_type"}),
            "knobs": {k: (v.type.__name__ if v.length is None else f"{v.type.__name__}[{v.length}]")
                      for k, v in self.knobs.items()},
            "text_output": self.text_output,
            "orchestrator": self.orchestrator,
            "partial_images": self.partial_images,
        }
