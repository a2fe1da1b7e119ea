"""Wire fields -> the canonical request, validated once.

`build_sampling_params(fields, images)` turns the union of fields the OpenAI
routes accept (already parsed from JSON, a multipart form or a chat message)
into the `SamplingParams` the offline API also takes. `RequestBuilder.build`
adds what needs the served model: resolution through the pipeline's own
`resolve` (request > stage defaults > pipeline defaults, derived values) and
the limits on *resolved* values (an omitted size still obeys the pixel limit).

Unset stays `None` all the way to `resolve`; nothing here invents a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..diffusion.capabilities import Capabilities, InvalidParams, Knob
from ..diffusion.params import ResolvedParams, SamplingParams
from .body import checked_int, checked_text, finite_float
from .image_input import decode_image
from .limits import Limits, RequestError
from .protocol import (
    FIELDS,
    IGNORED_FIELDS,
    SILENT_FIELDS,
    GenerationParams,
    copied_to,
    is_alias,
    parse_size,
    sampling_fields,
    validate_generation,
)

FIELDS_IN_ORDER = tuple(GenerationParams.model_fields)

TASKS = ("image", "edit", "video")
_URL_REFUSED = "response_format=url is not supported by this server (it keeps no image store); use b64_json"


@dataclass(frozen=True)
class OutputSpec:
    """How generated images are handed back (does not change the pixels)."""

    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    background: str = "auto"


@dataclass(frozen=True)
class CanonicalRequest:
    """What every route runs: the resolved engine request plus its output spec."""

    params: ResolvedParams
    output: OutputSpec
    task: str
    #: fields the request set that the server accepted without acting on them
    ignored: tuple[str, ...] = ()


def _positive(name: str, value: int | None, upper: int | None = None, flag: str = "") -> None:
    if value is None:
        return
    if value < 1:
        raise RequestError(f"`{name}` must be a positive integer, got {value}", name)
    if upper is not None and value > upper:
        raise RequestError(f"`{name}`={value} is above this server's limit of {upper} ({flag})", name)


def _coerce_knob(name: str, value: Any, knob: Knob, limits: Limits) -> Any:
    """A model's own knob, checked against its declared type (the pipeline checks the value)."""
    if knob.type is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise RequestError(f"`{name}` must be true or false, got {value!r}", name)
        return value
    if knob.type is tuple:
        if isinstance(value, str) and len(value) <= 256:  # a form field: JSON text (short: a few numbers)
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, list) or len(value) != knob.length:
            raise RequestError(f"`{name}` must be a list of {knob.length} numbers, got {value!r}", name)
        return tuple(finite_float(name, x, limits.max_float) for x in value)
    if knob.type is int:
        return checked_int(name, value)
    if knob.type is float:
        return finite_float(name, value, limits.max_float)
    if not isinstance(value, str):
        raise RequestError(f"`{name}` must be a string, got {type(value).__name__}", name)
    return checked_text(value, name)


def build_sampling_params(
    fields: Mapping[str, Any],
    images: Sequence[Any] = (),
    limits: Limits | None = None,
    *,
    require_prompt: bool = True,
    knobs: Mapping[str, Knob] | None = None,
) -> tuple[SamplingParams, OutputSpec, float | None]:
    """Validate wire fields; return (SamplingParams, OutputSpec, seconds).

    Args:
        fields: wire fields (JSON values, or strings from a form); null counts as not sent.
        images: raw bytes or PIL images (decoded and checked here).
        limits: the server's limits (defaults: `Limits()`).
        require_prompt: a missing `prompt` is an error.
        knobs: the served model's own fields (its `Capabilities.knobs`), accepted and
            passed in `SamplingParams.extra`.

    Returns:
        (the request, how to hand the output back, `seconds` of a video or None).
    """
    limits = limits or Limits()
    knobs = knobs or {}
    fields = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(fields) - FIELDS - set(knobs))
    if unknown:
        raise RequestError(f"unknown parameter(s): {', '.join(unknown)}", unknown[0])
    if require_prompt and "prompt" not in fields:
        raise RequestError("`prompt` is required", "prompt")

    if fields.get("response_format") == "url":
        raise RequestError(_URL_REFUSED, "response_format")
    checked = validate_generation({k: v for k, v in fields.items() if k not in knobs}, limits)
    values: dict[str, Any] = {}
    for wire in (w for w in FIELDS_IN_ORDER if w in checked.model_fields_set):
        value, ours = getattr(checked, wire), copied_to(wire)
        if value is None or ours is None:  # output / ignored fields; size and seconds below
            continue
        if wire == "lora":
            value = tuple((x.name, x.scale) for x in value)
        if ours in values and values[ours] != value:
            raise RequestError(f"`{wire}` conflicts with another field setting {ours}", wire)
        values[ours] = value
    _positive("n", values.get("num_outputs_per_prompt"), limits.max_n, "--omni-max-n")
    _positive("num_inference_steps", values.get("num_inference_steps"), limits.max_steps, "--omni-max-steps")
    _positive("num_frames", values.get("num_frames"), limits.max_frames, "--omni-max-frames")

    size = parse_size(checked.size, limits)
    if size is not None:
        values["width"], values["height"] = size

    seconds = checked.seconds
    if seconds is not None:
        if not seconds > 0:
            raise RequestError(f"`seconds` must be positive, got {seconds}", "seconds")
        if "num_frames" in values:
            raise RequestError("pass `seconds` or `num_frames`, not both", "seconds")

    if images:
        values["images"] = decode_images(images, limits)
    extra = {k: _coerce_knob(k, fields[k], knob, limits) for k, knob in knobs.items() if k in fields}
    if extra:
        values["extra"] = extra

    return SamplingParams(**values), _output_spec(checked), seconds


def decode_images(images: Sequence[Any], limits: Limits) -> list[Any]:
    """Input images (bytes or PIL) -> checked PIL images; the count and the pixels within `limits`."""
    if len(images) > limits.max_input_images:
        raise RequestError(f"{len(images)} input images; this server takes at most {limits.max_input_images}", "image")
    return [decode_image(img, limits, "image") for img in images]


def _output_spec(checked: GenerationParams) -> OutputSpec:
    """How to hand the output back (the fields are already checked against their declared values)."""
    output_format = checked.output_format or "png"
    background = checked.background or "auto"
    if background == "transparent" and output_format == "jpeg":
        raise RequestError("background=transparent needs output_format png or webp (jpeg has no alpha)", "background")
    return OutputSpec(checked.response_format or "b64_json", output_format, checked.output_compression, background)


class RequestBuilder:
    """Builds and resolves requests for one served model, by what that model declares.

    resolve_fn     the pipeline's `resolve(request, stage_defaults)` -- the same
                   function the engine and the offline API use
    capabilities   the pipeline's declaration (`diffusion/capabilities.py`): what
                   it outputs, how many images it takes, which fields it reads,
                   its own knobs
    """

    def __init__(
        self,
        resolve_fn: Callable[[SamplingParams, Any], ResolvedParams],
        capabilities: Capabilities,
        stage_defaults: SamplingParams | Mapping[str, Any] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.resolve_fn = resolve_fn
        self.capabilities = capabilities
        self.stage_defaults = stage_defaults
        self.limits = limits or Limits()

    @property
    def output_kind(self) -> str:
        return self.capabilities.output

    @property
    def knobs(self) -> Mapping[str, Knob]:
        return self.capabilities.knobs

    def build(
        self,
        fields: Mapping[str, Any],
        images: Sequence[Any] = (),
        *,
        task: str,
        ignored: Sequence[str] = (),
    ) -> CanonicalRequest:
        """Validate, check against the model's declaration, resolve.

        Args:
            fields: the route's wire fields (null = not sent).
            images: the request's input images (bytes or PIL).
            task: "image" | "edit" | "video": what the route makes.
            ignored: fields the route already accepted without acting on them
                (reported back with the ones found here).

        Returns:
            the CanonicalRequest the engine runs.

        Raises:
            RequestError: bad input, a field the model does not read, an image count
                it does not take, a value above a limit.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self._check_task(task)
        present = {k for k, v in fields.items() if v is not None and not (k == "size" and parse_size(v) is None)}
        self._check_honoured(present)
        request, output, seconds = build_sampling_params(fields, images, self.limits, knobs=self.knobs)
        self._check_image_count(task, len(images))  # after decoding: an undecodable file is named as such
        self._check_background(output.background)
        if seconds is not None:
            request = self._frames_from_seconds(request, seconds)
        params = self._resolve(request)
        self._check_resolved(params)
        reported = tuple(dict.fromkeys([*ignored, *sorted(present & set(IGNORED_FIELDS) - SILENT_FIELDS)]))
        return CanonicalRequest(params, output, task, reported)

    def _check_background(self, background: str) -> None:
        """`background` as the model declares its outputs (`Capabilities.background`), or auto."""
        made = self.capabilities.background
        if background in ("auto", made):
            return
        if background == "transparent":
            raise RequestError("background=transparent needs a layered model (one that makes transparent RGBA "
                               "outputs); this model makes opaque images", "background")
        what = "RGBA layers" if self.output_kind == "layers" else "RGBA images"
        raise RequestError(f"this model makes transparent {what}; send background=transparent or auto", "background")

    def _check_task(self, task: str) -> None:
        if task == "video" and self.output_kind != "video":
            raise RequestError("this model generates images, not videos; use /v1/images/generations", "model")
        if task in ("image", "edit") and self.output_kind == "video":
            raise RequestError("this model generates videos; use /v1/videos", "model")

    def _check_honoured(self, present: set[str]) -> None:
        """A generation field the model does not read is a 400 naming the wire field."""
        honoured = self.capabilities.honoured
        for wire in sorted(present - {"lora"}):  # (`lora`: the pipeline says whether it serves adapters)
            ours = sampling_fields(wire)
            unread = [f for f in ours if f not in honoured]
            if unread:
                raise RequestError(
                    f"`{wire}` is not used by this model; leave it out (this model reads: "
                    f"{', '.join(self._wire_fields())})",
                    wire,
                )

    def _wire_fields(self) -> list[str]:
        """The generation fields this model reads, by their wire names (for messages)."""
        honoured = self.capabilities.honoured
        wires = [w for w in FIELDS_IN_ORDER if (ours := sampling_fields(w)) and all(f in honoured for f in ours)
                 and not is_alias(w)]
        return sorted(wires) + sorted(self.knobs)

    def _check_image_count(self, task: str, count: int) -> None:
        caps = self.capabilities
        low, high = caps.input_images
        if task == "edit" and count == 0:
            raise RequestError("`image` is required for an edit", "image")
        if count and not caps.takes_images:
            raise RequestError(
                "this model does not take input images (text-to-image / text-to-video); send the prompt only",
                "image",
            )
        if count < low:
            route = "/v1/videos with `input_reference`" if caps.output == "video" else "/v1/images/edits"
            raise RequestError(f"this model needs {caps.describe_images()}; use {route}", "image")
        if high is not None and count > high:
            raise RequestError(f"this model takes {caps.describe_images()}, got {count}", "image")

    def _resolve(self, request: SamplingParams) -> ResolvedParams:
        # The pipeline says which of its refusals are the caller's (InvalidParams, UnsupportedField
        # among them): a 400. Anything else it raises is its own failure and goes on up (a 500).
        try:
            return self.resolve_fn(request, self.stage_defaults)
        except InvalidParams as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError(str(e), e.field) from e

    def _frames_from_seconds(self, request: SamplingParams, seconds: float) -> SamplingParams:
        # Derived from the *resolved* fps (principle 2); the pipeline then snaps
        # num_frames to what its VAE accepts.
        fps = self._resolve(request).fps
        if fps is None:
            raise RequestError("`seconds` needs a video model with a frame rate", "seconds")
        frames = int(round(seconds * fps)) + 1
        if frames > self.limits.max_frames:
            raise RequestError(
                f"seconds={seconds} at {fps} fps is {frames} frames, above this server's limit of "
                f"{self.limits.max_frames} (--omni-max-frames)",
                "seconds",
            )
        request.num_frames = frames
        return request

    def _check_resolved(self, p: ResolvedParams) -> None:
        lim = self.limits
        if p.height is not None and p.width is not None and p.height * p.width > lim.max_pixels:
            raise RequestError(
                f"the resolved size {p.width}x{p.height} is {p.width * p.height} pixels, above this server's "
                f"limit of {lim.max_pixels} (--omni-max-pixels)",
                "size",
            )
        if p.num_frames is not None and p.num_frames > lim.max_frames:
            raise RequestError(
                f"the resolved num_frames={p.num_frames} is above this server's limit of {lim.max_frames} "
                "(--omni-max-frames)",
                "num_frames",
            )
        if p.num_inference_steps > lim.max_steps:
            raise RequestError(
                f"the resolved num_inference_steps={p.num_inference_steps} is above this server's limit of "
                f"{lim.max_steps} (--omni-max-steps)",
                "num_inference_steps",
            )
        if p.num_outputs_per_prompt > lim.max_n:
            raise RequestError(f"n={p.num_outputs_per_prompt} is above this server's limit of {lim.max_n}", "n")

