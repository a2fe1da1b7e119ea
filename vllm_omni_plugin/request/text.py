"""Text answers (the AR stage of a multi-stage model): chat fields -> the AR stage's sampling values.

`build_text_request` validates the OpenAI chat sampling fields once and
resolves them by the same precedence as image requests: request value > the
AR stage's `default_sampling_params` (stage config) > vLLM's own defaults.
What comes out is a plain mapping of `vllm.SamplingParams` keyword arguments
(this package imports no vLLM; the server builds the vLLM object, and vLLM's
own checks of the values -- temperature >= 0, top_p in (0, 1] ... -- still
apply there and become 400s).

Input images of the conversation are decoded and checked against the same
limits as image inputs of the image routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .builder import FIELDS, IGNORED_FIELDS, _coerce, _positive, decode_images
from .limits import Limits, RequestError

# OpenAI chat field -> (vllm.SamplingParams field, kind)
TEXT_SAMPLING: dict[str, tuple[str, str]] = {
    "max_tokens": ("max_tokens", "int"),
    "max_completion_tokens": ("max_tokens", "int"),
    "min_tokens": ("min_tokens", "int"),
    "temperature": ("temperature", "float"),
    "top_p": ("top_p", "float"),
    "top_k": ("top_k", "int"),
    "min_p": ("min_p", "float"),
    "seed": ("seed", "int"),
    "n": ("n", "int"),
    "presence_penalty": ("presence_penalty", "float"),
    "frequency_penalty": ("frequency_penalty", "float"),
    "repetition_penalty": ("repetition_penalty", "float"),
    "stop": ("stop", "stop"),
}
# Chat fields that are not sampling values (read by the route, or without effect on the answer).
CHAT_FIELDS = ("messages", "model", "user", "modalities", "stream")
# Fields that only mean something for an image answer.
IMAGE_ONLY_FIELDS = FIELDS - frozenset(TEXT_SAMPLING) - frozenset(IGNORED_FIELDS)


@dataclass(frozen=True)
class TextRequest:
    """A text answer to compute: vLLM sampling keyword arguments (resolved) and the input images."""

    sampling: Mapping[str, Any]
    images: list[Any] = field(default_factory=list)


def build_text_request(
    fields: Mapping[str, Any],
    images: Sequence[Any] = (),
    limits: Limits | None = None,
    defaults: Mapping[str, Any] | None = None,
    extensions: Sequence[str] = (),
) -> TextRequest:
    """Validate a chat body's sampling fields; `defaults` are the AR stage's default sampling params.

    `extensions` are the image model's own knobs (image-only fields too). A field sent as null counts as not sent.
    """
    limits = limits or Limits()
    fields = {k: v for k, v in fields.items() if v is not None}
    image_only = sorted(k for k in fields if k in IMAGE_ONLY_FIELDS or k in extensions)
    if image_only:
        raise RequestError(
            f"`{image_only[0]}` is a field of image generation; to get an image answer send "
            '`"modalities": ["image"]`, otherwise leave it out',
            image_only[0],
        )
    unknown = sorted(set(fields) - set(TEXT_SAMPLING) - set(CHAT_FIELDS) - set(IGNORED_FIELDS))
    if unknown:
        raise RequestError(
            f"unsupported parameter(s) for a text answer: {', '.join(unknown)} "
            f"(supported: {', '.join(sorted(TEXT_SAMPLING))})",
            unknown[0],
        )
    values: dict[str, Any] = {}
    for wire, (ours, kind) in TEXT_SAMPLING.items():
        if wire not in fields:
            continue
        value = _stop(fields[wire]) if kind == "stop" else _coerce(wire, fields[wire], kind, limits)
        if ours in values and values[ours] != value:
            raise RequestError(f"`{wire}` conflicts with another field setting {ours}", wire)
        values[ours] = value
    _positive("n", values.get("n"), limits.max_n, "--omni-max-n")
    _positive("max_tokens", values.get("max_tokens"))
    seed = values.get("seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(f"`seed` must be in [0, 2**63), got {seed}", "seed")
    resolved = {**dict(defaults or {}), **values}
    return TextRequest(resolved, decode_images(images, limits) if images else [])


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RequestError("`stop` must be a string or a list of strings", "stop")
