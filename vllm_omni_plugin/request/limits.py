"""Request limits and the error every validation failure raises."""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(ValueError):
    """Bad input: the caller gets `status` (400 unless said otherwise) and `message`.

    `param` names the offending request field, as OpenAI error bodies do.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
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
    """

    max_pixels: int = 2048 * 2048
    max_frames: int = 241
    max_n: int = 8
    max_steps: int = 200
    max_input_pixels: int = 8192 * 8192
    max_input_images: int = 16
