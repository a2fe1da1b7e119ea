"""Generated images -> encoded files (png / jpeg / webp), base64 for JSON bodies."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ..diffusion.output import DiffusionOutput
from ..request.builder import OutputSpec


def _pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def encode_image(image: Any, spec: OutputSpec) -> bytes:
    img = _pil(image)
    if spec.output_format == "jpeg" and img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    if spec.output_format == "png":
        # output_compression for png is zlib effort (0-100 -> 0-9); pixels are lossless either way.
        level = 6 if spec.output_compression is None else round(spec.output_compression * 9 / 100)
        img.save(buf, format="PNG", compress_level=level)
    elif spec.output_format == "jpeg":
        quality = 95 if spec.output_compression is None else max(1, 100 - spec.output_compression)
        img.save(buf, format="JPEG", quality=quality)
    else:
        if spec.output_compression is None or spec.output_compression == 0:
            img.save(buf, format="WEBP", lossless=True)
        else:
            img.save(buf, format="WEBP", quality=max(1, 100 - spec.output_compression))
    return buf.getvalue()


def output_images(output: DiffusionOutput) -> list[Any]:
    """The images of an image or layered output, flattened (layers in order, per output)."""
    if output.kind == "layers":
        return [layer for layers in output.layers for layer in layers]
    if output.kind == "image":
        return list(output.images)
    raise ValueError(f"request {output.request_id} produced {output.kind!r}, not images")


def b64_images(output: DiffusionOutput, spec: OutputSpec) -> list[str]:
    return [base64.b64encode(encode_image(img, spec)).decode("ascii") for img in output_images(output)]


MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
