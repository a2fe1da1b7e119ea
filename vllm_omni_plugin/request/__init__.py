"""The ONE canonical-request builder (ARCHITECTURE.md, principle 1).

Every entry point -- `/v1/images/generations`, `/v1/images/edits`,
`/v1/chat/completions` (image answers), `/v1/videos`, and anything later -- hands its wire
fields to `RequestBuilder.build`, which validates them once and returns the
`ResolvedParams` the diffusion engine runs (the offline `Omni.generate` takes
the same `SamplingParams` that `build_sampling_params` produces and resolves
it with the same `resolve`). No route builds stage inputs itself.

    limits.py       Limits (pixels, frames, n, steps, input images, bodies) and RequestError
    body.py         JSON bodies and scalars: size, depth, finite numbers, valid Unicode
    image_input.py  the one input-image path: URL fetch (data/file/http, allowlist at every
                    hop, one deadline) -> bytes -> decode with header checks
    messages.py     the structure of a chat body's `messages` (image answers; text answers are vLLM's)
    protocol.py     the bodies of the routes as pydantic models (OpenAI's names and types, our
                    extension fields described): the OpenAPI document and the field checks
    builder.py      wire fields -> SamplingParams -> ResolvedParams (+ the model's declaration, limits)

This package imports neither vLLM nor FastAPI (aiohttp fetches image URLs).
"""

from .builder import RequestBuilder, build_sampling_params
from .body import parse_json_object
from .image_input import MediaPolicy, decode_image, fetch_image_bytes
from .limits import Limits, RequestError
from .messages import check_messages
from .protocol import FIELDS, parse_size

__all__ = [
    "FIELDS",
    "Limits",
    "MediaPolicy",
    "RequestBuilder",
    "RequestError",
    "build_sampling_params",
    "check_messages",
    "decode_image",
    "fetch_image_bytes",
    "parse_json_object",
    "parse_size",
]
