"""The request bodies of the omni routes, as pydantic models.

One model per endpoint body, with OpenAI's field names and types
(openai/types/image_generate_params.py, image_edit_params.py,
video_create_params.py) and this server's extension fields, each with a
description. The server's OpenAPI document is built from them
(`openapi_components`); `GenerationParams` also validates the generation part
of every body (the request builder calls `validate_generation`).

Validation keeps the request layer's rules, not pydantic's defaults: every
field goes through one before-validator that calls body.py's `checked_int` /
`finite_float` / `checked_text` (a form string "2" is an int, 2.5 is not;
NaN, Infinity and "1e999" are refused; text is valid Unicode) and the bound
its field declares (`ge` / `le`), with the messages and `param` of a
`RequestError`. What pydantic checks afterwards can no longer fail.

What is not here: which of these fields the served model reads (its
`Capabilities`, checked by the builder), its own knobs (declared by the model,
`SamplingParams.extra`), and the limits of a server (`Limits`, checked on
resolved values).
"""

from __future__ import annotations

import json

import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator
from pydantic.json_schema import models_json_schema

from .. import registry
from ..diffusion.capabilities import Knob
from .body import checked_int, checked_text, finite_float
from .limits import Limits, RequestError


@dataclass(frozen=True)
class Sets:
    """Field metadata: the `SamplingParams` field(s) a wire field sets, where its name differs.
    `alias`: the wire field only renames another wire field (messages list that one);
    `derived`: the value is converted, not copied (`size` -> width and height)."""

    fields: tuple[str, ...]
    alias: bool = False
    derived: bool = False


_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def parse_size(value: Any, limits: Limits | None = None) -> tuple[int, int] | None:
    """"WxH" -> (width, height); "auto" or None -> None (the model's default).

    Args:
        value: the `size` field as sent.
        limits: given, the size must be within `limits.max_pixels`.

    Returns:
        (width, height), or None for the model's default.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f"size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {value!r}", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise RequestError(f"size must have a positive width and height, got {value!r}", "size")
    if limits is not None and width * height > limits.max_pixels:
        raise RequestError(
            f"size {width}x{height} is {width * height} pixels, above this server's limit of "
            f"{limits.max_pixels} (--omni-max-pixels)",
            "size",
        )
    return width, height


#: the bound of a guidance weight: 0 disables guidance; diffusers' pipelines use 1-20
_GUIDANCE = dict(ge=0.0, le=100.0)
_SIZE_HELP = ('"WIDTHxHEIGHT" (e.g. "1024x1024") or "auto" (the model\'s default); within --omni-max-pixels '
              "after resolution")


class LoraSelection(BaseModel):
    """One LoRA adapter of a request and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, description="The adapter's name (as listed in /v1/models).")
    scale: float = Field(1.0, ge=-16, le=16, allow_inf_nan=False,
                         description="Multiplies the adapter's delta (1.0: as trained; 0: off).")


class _GenerationParams(BaseModel):
    """What every generation body may carry besides its inputs: the canonical request's fields by
    their wire names (the shared ones, and those families declare: `Family.params`), how the
    output is handed back, and OpenAI fields accepted without effect.

    Unset (or null) means the model's default: request > stage defaults > the pipeline's own."""

    # Unknown fields are refused by the builder, naming them (and a served model's knobs are not
    # fields of this model); "forbid" here is the backstop.
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="What to generate (an edit: the instruction).")
    negative_prompt: str | None = Field(
        None, description="What to steer away from (models with classifier-free guidance).")
    n: Annotated[int | None, Sets(("num_outputs_per_prompt",))] = Field(
        None, ge=1, description="Outputs to generate (at most --omni-max-n).")
    size: Annotated[str | None, Sets(("width", "height"), derived=True)] = Field(None, description=_SIZE_HELP)
    seed: int | None = Field(
        None, ge=0, lt=2**64,
        description="Seed of the initial noise: the same seed and parameters give the same output on every route.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (at most --omni-max-steps).")
    guidance_scale: float | None = Field(
        None, **_GUIDANCE, description="Guidance weight (CFG; guidance-distilled models: the embedded guidance).")
    num_frames: int | None = Field(None, ge=1, description="Video frames (at most --omni-max-frames).")
    fps: int | None = Field(None, ge=1, description="Frame rate of the exported video.")
    seconds: Annotated[float | str | None, Sets(("num_frames",), derived=True)] = Field(
        None, description="Video length in seconds (OpenAI's field; a number or a numeric string): "
        "num_frames = seconds x fps + 1 at the resolved fps. Give `seconds` or `num_frames`.")
    max_sequence_length: int | None = Field(
        None, ge=1, description="Text-encoder token budget of the prompt (models that declare it).")
    cache_threshold: float | None = Field(
        None, description="Step-cache threshold (>= 0; 0 or unset: every step computed). Models that cache only.")
    partial_images: int | None = Field(
        None, ge=0, le=3,
        description="With `stream: true` on the image routes: partial images (0-3) streamed before each "
        "completed image, decoded from the model's estimate of the clean image at evenly spaced steps.")
    response_format: Literal["b64_json"] | None = Field(
        None, description="b64_json, the only one: this server keeps no image store (OpenAI's `url` is refused).")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description='Image encoding (default png; "jpg" is taken as jpeg).')
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg / webp quality, 0-100.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="transparent: models that make RGBA outputs (png or webp); opaque: the others.")
    model: str | None = Field(
        None, description="A served model name (omitted: the one this server serves), or the name of a LoRA adapter "
        "the server serves (listed in /v1/models with the base model as `parent`): that adapter at scale 1.0.")
    lora: list[LoraSelection] | None = Field(
        None, max_length=16,
        description="LoRA adapters to apply, with their scales (vllm-omni extension): "
        '[{"name": "NAME", "scale": 0.8}, ...]; names as listed in /v1/models. Requests with different '
        "adapters still share denoise steps. With `model` naming an adapter too, both apply (this list's scale "
        "wins for the same name).")
    user: str | None = Field(None, description="End-user id (OpenAI's field); metadata only.")
    quality: str | None = Field(
        None, description="OpenAI's field; accepted, no effect here (listed in `omni.ignored`).")
    style: str | None = Field(
        None, description="OpenAI's field; accepted, no effect here (listed in `omni.ignored`).")
    moderation: str | None = Field(
        None, description="OpenAI's field; accepted, no effect here (listed in `omni.ignored`).")
    input_fidelity: str | None = Field(
        None, description="OpenAI's edit field; accepted, no effect here (listed in `omni.ignored`).")

    @field_validator("*", mode="before")
    @classmethod
    def _checked(cls, value: Any, info: ValidationInfo) -> Any:
        """The request layer's checks for every field, by its declared type and bounds."""
        if value is None:
            return None
        name = info.field_name
        field = cls.model_fields[name]
        limits = (info.context or {}).get("limits") or Limits()
        return _check_value(name, value, field.annotation, field.metadata, limits)


def _family_fields() -> dict[str, Any]:
    """The wire fields of the families' params (registry.Family.params) and of their aliases."""
    out: dict[str, Any] = {}
    for name, p in registry.params().items():
        bounds = {k: v for k, v in (("ge", p.ge), ("le", p.le)) if v is not None}
        out[name] = (p.type | None, Field(None, **bounds, description=p.description))
        for alias in p.aliases:
            out[alias] = (Annotated[p.type | None, Sets((name,), alias=True)],
                          Field(None, **bounds, description=f"Alias of `{name}` (give one of them)."))
    return out


GenerationParams = create_model("GenerationParams", __base__=_GenerationParams, __module__=__name__,
                                **_family_fields())
GenerationParams.__doc__ = _GenerationParams.__doc__


def _check_value(name: str, value: Any, annotation: Any, metadata: list[Any], limits: Limits) -> Any:
    if name == "lora":  # a list of {name, scale}: a form sends it as JSON text
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise RequestError("`lora` must be a list of {name, scale} (JSON in a form)", "lora") from None
        if not isinstance(value, list):
            raise RequestError(f"`lora` must be a list of {{name, scale}}, got {type(value).__name__}", "lora")
        names = [x.get("name") if isinstance(x, dict) else None for x in value]
        if len(set(map(str, names))) != len(names):
            raise RequestError("`lora` names an adapter twice", "lora")
        return value
    if name == "size":  # a string of its own grammar: checked (and parsed later) by parse_size
        parse_size(value)
        return value
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(kinds[0]) is Literal:
        allowed = typing.get_args(kinds[0])
        if name == "output_format" and value == "jpg":
            value = "jpeg"
        if value not in allowed:
            raise RequestError(f"{name} must be one of {', '.join(allowed)}, got {_short(value)}", name)
        return value
    if kinds[0] is str and str in kinds and float in kinds:  # `seconds`: OpenAI sends a numeric string
        number = finite_float(name, value, limits.max_float)
    elif kinds[0] is str:
        if not isinstance(value, str):
            raise RequestError(f"`{name}` must be a string, got {type(value).__name__}", name)
        return checked_text(value, name)
    elif kinds[0] is int:
        number = checked_int(name, value)
    else:
        number = finite_float(name, value, limits.max_float)
    _check_bounds(name, number, metadata, kinds[0] is int)
    return number


def _check_bounds(name: str, number: float, metadata: list[Any], integer: bool) -> None:
    low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    below = next((m.lt for m in metadata if isinstance(m, annotated_types.Lt)), None)
    if integer and low == 1 and number < 1:
        raise RequestError(f"`{name}` must be a positive integer, got {number}", name)
    if below is not None and not (low or 0) <= number < below:
        raise RequestError(f"`{name}` must be in [{low or 0}, 2**64), got {number}"
                           if below == 2**64 else f"`{name}` must be in [{low}, {below}), got {number}", name)
    if low is not None and high is not None and not low <= number <= high:
        bounds = f"[{low:g}, {high:g}]" if not integer else f"[{low}, {high}]"
        raise RequestError(f"`{name}` must be within {bounds}, got {number:g}", name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: every field of a generation body, by its wire name
FIELDS = frozenset(GenerationParams.model_fields)
#: OpenAI fields accepted without effect: a request that sets them gets them back in `omni.ignored`,
#: except `model` (checked by the route) and `user` (metadata only)
IGNORED_FIELDS = ("model", "user", "quality", "style", "moderation", "input_fidelity")
SILENT_FIELDS = frozenset({"model", "user"})
#: fields about the output's encoding, not the pixels
OUTPUT_FIELDS = ("response_format", "output_format", "output_compression", "background")


def sampling_fields(wire: str) -> tuple[str, ...]:
    """The `SamplingParams` field(s) the wire field `wire` sets (() for output and ignored fields)."""
    if wire in OUTPUT_FIELDS or wire in IGNORED_FIELDS or wire not in FIELDS:
        return ()
    sets = _sets(wire)
    return sets.fields if sets is not None else (wire,)


def _sets(wire: str) -> Sets | None:
    return next((m for m in GenerationParams.model_fields[wire].metadata if isinstance(m, Sets)), None)


def is_alias(wire: str) -> bool:
    """Whether the wire field `wire` only renames another one (`cfg_scale`)."""
    sets = _sets(wire)
    return sets is not None and sets.alias


def copied_to(wire: str) -> str | None:
    """The `SamplingParams` field the value of `wire` is copied into unchanged; None for output and
    ignored fields and for fields converted on the way (`size`, `seconds`)."""
    ours = sampling_fields(wire)
    sets = _sets(wire)
    return ours[0] if len(ours) == 1 and not (sets is not None and sets.derived) else None


def validate_generation(fields: Mapping[str, Any], limits: Limits) -> GenerationParams:
    """Check the generation fields of a body (JSON values, or form strings) against `GenerationParams`.

    Args:
        fields: wire fields, none of them unknown (the builder refuses those first, naming them).
        limits: the server's limits (`max_float` bounds every float).

    Returns:
        the validated model (numbers parsed, text checked).

    Raises:
        RequestError: the first bad field, named, with the request layer's message.
    """
    try:
        return GenerationParams.model_validate(dict(fields), context={"limits": limits})
    except ValidationError as e:
        error = e.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, RequestError):
            raise cause from None
        param = str(error["loc"][0]) if error.get("loc") else None
        raise RequestError(f"`{param}`: {error['msg']}" if param else error["msg"], param) from None


# ---- endpoint bodies (OpenAPI) ---------------------------------------------------------------

class ImageURL(BaseModel):
    """An input image by URL: http(s) (within --allowed-media-domains), `data:` (base64), or `file:`
    (under --allowed-local-media-path)."""

    model_config = ConfigDict(extra="forbid")
    image_url: str = Field(description="The image's URL.")


_STREAM_HELP = ("true: answer with server-sent events (text/event-stream): `partial_images` partial-image "
                "events, then one completed event per image (models that can stream; see docs/server.md).")


class ImageGenerationRequest(GenerationParams):
    """POST /v1/images/generations (JSON): text to image(s)."""

    prompt: str = Field(description="What to generate.")
    stream: bool | None = Field(None, description=_STREAM_HELP)


class ImageEditRequest(GenerationParams):
    """POST /v1/images/edits as JSON: the input images by URL."""

    prompt: str = Field(description="The edit instruction.")
    images: list[ImageURL] = Field(description="Input images, in order (as many as the served model takes).")
    stream: bool | None = Field(None, description=_STREAM_HELP)


class ImageEditForm(GenerationParams):
    """POST /v1/images/edits as multipart/form-data (OpenAI's upload form): `image` (or `image[]`)
    files, the other fields as form values. `mask` is refused (the model edits from the instruction)."""

    prompt: str = Field(description="The edit instruction.")
    image: list[bytes] = Field(
        description="Input image file(s) (png, jpeg, webp ...); several as repeated `image` / `image[]` parts.")
    stream: bool | None = Field(None, description=_STREAM_HELP)


class VideoCreateRequest(GenerationParams):
    """POST /v1/videos (JSON): queue a video job; poll GET /v1/videos/{id}."""

    prompt: str = Field(description="What to generate.")
    input_reference: ImageURL | None = Field(
        None, description="The first frame / reference image (image-to-video models).")


class VideoCreateForm(GenerationParams):
    """POST /v1/videos as multipart/form-data: `input_reference` an uploaded image file, or
    `input_reference[image_url]` a URL."""

    prompt: str = Field(description="What to generate.")
    input_reference: bytes | None = Field(
        None, description="The first frame / reference image file (image-to-video models).")


class ChatImageRequest(GenerationParams):
    """POST /v1/chat/completions answered with images (`modalities: ["image"]`, or a diffusion-only
    model). The prompt is the text of the last user message, its `image_url` parts the input images
    of an edit; the generation fields mean what they mean on /v1/images/generations (with the
    openai client, in `extra_body`). Text answers take vLLM's own ChatCompletionRequest."""

    messages: list[dict[str, Any]] = Field(
        min_length=1,
        description='OpenAI chat messages; content a string or parts {"type": "text", "text": ...} / '
        '{"type": "image_url", "image_url": {"url": ...}}.')
    modalities: list[Literal["text", "image"]] | None = Field(
        None, description='["image"] for an image answer; omitted: images unless the model also answers text.')
    stream: bool | None = Field(
        None, description="true: `chat.completion.chunk` server-sent events as vLLM's streaming chat sends them: "
        "a role chunk, the images as one content chunk, a finish chunk (`finish_reason` stop, `omni`), "
        "`data: [DONE]`.")
    stream_options: dict[str, Any] | None = Field(
        None, description="With `stream: true`: {\"include_usage\": true} adds a last chunk with `usage` "
        "(zeros: this server does not meter tokens).")
    max_tokens: int | None = Field(None, description="Chat sampling field: accepted, no effect (`omni.ignored`).")
    max_completion_tokens: int | None = Field(
        None, description="Chat sampling field: accepted, no effect (`omni.ignored`).")
    temperature: float | None = Field(None, description="Chat sampling field: accepted, no effect (`omni.ignored`).")
    top_p: float | None = Field(None, description="Chat sampling field: accepted, no effect (`omni.ignored`).")


#: route path -> (content type -> body model), for the OpenAPI document
ROUTE_BODIES: dict[str, dict[str, type[BaseModel]]] = {
    "/v1/images/generations": {"application/json": ImageGenerationRequest},
    "/v1/images/edits": {"multipart/form-data": ImageEditForm, "application/json": ImageEditRequest},
    "/v1/videos": {"application/json": VideoCreateRequest, "multipart/form-data": VideoCreateForm},
    "/v1/chat/completions": {"application/json": ChatImageRequest},
}


def openapi_components(knobs: Mapping[str, Knob] | None = None) -> dict[str, Any]:
    """JSON schemas of every body model, for an OpenAPI document's `components.schemas`.

    Args:
        knobs: the served model's own fields (its `Capabilities.knobs`): added to every body,
            with their declared types and descriptions.

    Returns:
        schema name -> JSON schema.
    """
    models = {m for bodies in ROUTE_BODIES.values() for m in bodies.values()}
    _, top = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    extra = {name: _knob_schema(knob) for name, knob in (knobs or {}).items()}
    for model in models:
        schemas[model.__name__]["properties"].update(extra)
    return schemas


def _knob_schema(knob: Knob) -> dict[str, Any]:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if knob.type is tuple:
        schema: dict[str, Any] = {"type": "array", "items": {"type": "number"}, "minItems": knob.length,
                                  "maxItems": knob.length}
    else:
        schema = {"type": kind[knob.type]}
    return {**schema, "description": knob.description or "A knob of the served model."}


def request_body(path: str) -> dict[str, Any]:
    """The OpenAPI `requestBody` of the omni route at `path` (its schemas by reference)."""
    content = {kind: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
               for kind, model in ROUTE_BODIES[path].items()}
    return {"required": True, "content": content}
