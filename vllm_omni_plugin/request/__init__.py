"""The ONE canonical-request builder (ARCHITECTURE.md, principle 1).

Every entry point -- `/v1/images/generations`, `/v1/images/edits`,
`/v1/chat/completions` (image answers), `/v1/videos`, and anything later -- hands its wire
fields to `RequestBuilder.build`, which validates them once and returns the
`ResolvedParams` the diffusion engine runs (the offline `Omni.generate` takes
the same `SamplingParams` that `build_sampling_params` produces and resolves
it with the same `resolve`). No route builds stage inputs itself.

    limits.py   Limits (pixels, frames, n, steps, input images) and RequestError
    images.py   decoding of input images (bytes or PIL) with limits
    builder.py  wire fields -> SamplingParams -> ResolvedParams (+ limit checks)

This package imports neither vLLM nor FastAPI.
"""

from .builder import FIELDS, RequestBuilder, build_sampling_params, parse_size
from .images import decode_image
from .limits import Limits, RequestError

__all__ = [
    "FIELDS",
    "Limits",
    "RequestBuilder",
    "RequestError",
    "build_sampling_params",
    "decode_image",
    "parse_size",
]
