"""Input images: bytes or PIL images in, checked PIL images out."""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image

from .limits import Limits, RequestError


def decode_image(data: Any, limits: Limits, param: str = "image") -> Image.Image:
    """A loaded PIL image in RGB (or RGBA when it has transparency).

    `data` is raw file bytes (an upload) or a PIL image (already fetched).
    Undecodable data and images above `limits.max_input_pixels` raise RequestError.
    """
    if isinstance(data, Image.Image):
        image = data
    elif isinstance(data, (bytes, bytearray)):
        if not data:
            raise RequestError(f"`{param}` is empty", param)
        image = _open(bytes(data), limits, param)
    else:
        raise RequestError(f"`{param}` must be an image file, got {type(data).__name__}", param)
    _check_pixels(*image.size, limits, param)
    if image.mode in ("RGB", "RGBA"):
        return image
    has_alpha = image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def _open(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # A decompression bomb is an error here, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(*image.size, limits, param)  # before decoding the pixels
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"`{param}` could not be decoded as an image: {e}", param) from e
    return image


def _check_pixels(width: int, height: int, limits: Limits, param: str) -> None:
    if width * height > limits.max_input_pixels:
        raise RequestError(
            f"`{param}` is {width}x{height} ({width * height} pixels), above the limit of "
            f"{limits.max_input_pixels} pixels",
            param,
        )
