"""Request limits and the error every validation failure raises."""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(ValueError):
    """Bad input: the caller gets `status` (400 unless said otherwise) and `message`.

    `param` names the offending request field, as OpenAI error bodies do.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        # A message quotes client input; keep it encodable (a lone surrogate would
        # break the error response itself).
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Upper bounds a server (or an offline caller) puts on one request.

    max_pixels        output width * height, after resolution (per image / frame)
    max_frames        output video frames, after resolution
    max_n             outputs per request
    max_steps         denoising steps
    max_input_pixels  width * height of each input image
    max_input_images  input images per request
    max_input_bytes   bytes of one input image file (upload, data URL, fetched URL)
    free_input_pixels input images up to this many pixels decode whatever their file size;
                      above it a file must hold at least one byte per `max_pixels_per_byte`
                      pixels. Deflate cannot compress more than ~1032:1, so an honest RGB
                      PNG keeps well above that; an 8 KB 1-bit PNG declaring 8000x8000
                      (seconds of CPU to decode and convert) does not.
    max_pixels_per_byte  see free_input_pixels
    max_body_bytes    bytes of one JSON request body (data URLs included)
    max_json_depth    nesting of arrays / objects in a JSON body
    max_float         magnitude of any float parameter (guidance scales, model knobs)
    """

    max_pixels: int = 2048 * 2048
    max_frames: int = 241
    max_n: int = 8
    max_steps: int = 200
    max_input_pixels: int = 8192 * 8192
    max_input_images: int = 16
    max_input_bytes: int = 64 * 1024 * 1024
    free_input_pixels: int = 4096 * 1024
    max_pixels_per_byte: int = 1024
    max_body_bytes: int = 96 * 1024 * 1024
    max_json_depth: int = 32
    max_float: float = 1e6
