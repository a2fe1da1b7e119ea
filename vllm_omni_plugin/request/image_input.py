"""The one path every input image takes: source -> bytes -> checked PIL image.

    upload (multipart file)          bytes as received
    data: URL (edits JSON, chat)     `fetch_image_bytes` -> base64-decoded bytes
    file: URL                        `fetch_image_bytes` -> bytes, only below the allowed local path
    http(s) URL                      `fetch_image_bytes` -> bytes, under `MediaPolicy`
                       all of them -> `decode_image` (in the request builder)

`decode_image` reads the header first and refuses, before any pixel is
decoded, an image above `Limits.max_input_pixels` or one whose file is far too
small for its declared size (`Limits.free_input_pixels`, `max_pixels_per_byte`):
the same bytes get the same answer whichever way they came.

`fetch_image_bytes` keeps vLLM's media rules (`--allowed-media-domains`,
`--allowed-local-media-path`, `VLLM_MEDIA_URL_ALLOW_REDIRECTS`,
`VLLM_IMAGE_FETCH_TIMEOUT`; the server builds the `MediaPolicy` from them) and
tightens two: redirects are followed by hand, so every hop's host is checked
against the allowlist (aiohttp's own redirect handling would not), and the
timeout is one deadline over the whole fetch -- connect, every redirect and
every body chunk -- so a server that sends a few bytes and stalls cannot hold
a request past it (vLLM's per-attempt timeout with retries can).

No vLLM and no FastAPI here; aiohttp does the HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

from PIL import Image

from .limits import Limits, RequestError

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class MediaPolicy:
    """What may be fetched for an image URL, and how long it may take.

    allowed_local_media_path  file: URLs are served only below this directory (None: no file: URLs)
    allowed_media_domains     http(s) hosts allowed, checked at every redirect hop (None / empty: any)
    timeout_s                 one deadline for a whole fetch (connect, redirects, body)
    max_redirects             redirects followed (0: a redirect is refused)
    max_bytes                 the largest image file accepted
    """

    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    timeout_s: float = 5.0
    max_redirects: int = 5
    max_bytes: int = Limits.max_input_bytes

    @classmethod
    def create(cls, allowed_local_media_path: str | Path | None, allowed_media_domains: Any,
               timeout_s: float, allow_redirects: bool, max_bytes: int) -> "MediaPolicy":
        """A policy from server settings; the local media path must be an existing directory.

        Args:
            allowed_local_media_path: `--allowed-local-media-path` ("" / None: none).
            allowed_media_domains: `--allowed-media-domains` (None / empty: any host).
            timeout_s: the whole-fetch deadline (`VLLM_IMAGE_FETCH_TIMEOUT`).
            allow_redirects: `VLLM_MEDIA_URL_ALLOW_REDIRECTS`.
            max_bytes: the largest image file accepted.

        Returns:
            The policy.
        """
        local = None
        if allowed_local_media_path:
            local = Path(allowed_local_media_path).resolve()
            if not local.is_dir():
                raise ValueError(f"--allowed-local-media-path {local} is not an existing directory")
        domains = tuple(allowed_media_domains) if allowed_media_domains else None
        return cls(local, domains, float(timeout_s), 5 if allow_redirects else 0, max_bytes)


async def fetch_image_bytes(url: Any, policy: MediaPolicy, param: str = "image_url") -> bytes:
    """The bytes of an image given by URL (data:, file: or http(s):), under `policy`.

    Args:
        url: what the client sent as the URL.
        policy: the server's media rules.
        param: the request field, named in errors.

    Returns:
        The file's bytes (not decoded: `decode_image` does that, for every source alike).
    """
    if not isinstance(url, str) or not url:
        raise RequestError(f"`{param}` must be a non-empty URL string", param)
    scheme = url[:8].split(":", 1)[0].lower() if ":" in url[:8] else ""
    if scheme == "data":
        return _data_url_bytes(url, policy, param)
    if scheme == "file":
        return await asyncio.to_thread(_file_url_bytes, url, policy, param)
    if scheme in ("http", "https"):
        try:
            async with asyncio.timeout(policy.timeout_s):
                return await _http_bytes(url, policy, param)
        except TimeoutError:
            raise RequestError(f"`{param}`: fetching {_show(url)} took longer than {policy.timeout_s:g} s", param) \
                from None
    raise RequestError(f"`{param}` must be an HTTP, data or file URL", param)


def _data_url_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    # RFC 2397: data:[<mediatype>][;<param>=<value>]*[;base64],<data>
    spec, sep, data = url[5:].partition(",")
    if not sep or not spec.endswith(";base64"):
        raise RequestError(f"`{param}`: only base64 data URLs (data:image/png;base64,...) are supported", param)
    if len(data) // 4 * 3 > policy.max_bytes:
        raise RequestError(f"`{param}`: the image is larger than this server's limit of {policy.max_bytes} bytes",
                           param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"`{param}`: the data URL is not valid base64: {e}", param) from None


def _file_url_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise RequestError(f"`{param}`: file URLs are not allowed (the server has no --allowed-local-media-path)",
                           param)
    try:
        parts = urlsplit(url)
        path = Path(url2pathname(unquote(parts.netloc + parts.path))).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a malformed netloc ...
        raise RequestError(f"`{param}`: {_show(url)} is not a valid file URL: {e}", param) from None
    if root not in path.parents:
        raise RequestError(f"`{param}`: the file path must be a subpath of --allowed-local-media-path", param)
    try:
        if path.stat().st_size > policy.max_bytes:
            raise RequestError(f"`{param}`: the file is larger than this server's limit of {policy.max_bytes} bytes",
                               param)
        return path.read_bytes()
    except OSError as e:
        raise RequestError(f"`{param}`: the file could not be read: {e.strerror}", param) from None


def _check_host(url: str, policy: MediaPolicy, param: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise RequestError(f"`{param}`: {_show(url)} is not an http(s) URL", param)
    if policy.allowed_media_domains and parts.hostname not in policy.allowed_media_domains:
        raise RequestError(
            f"`{param}`: the host {parts.hostname!r} is not one of the allowed media domains "
            f"({', '.join(policy.allowed_media_domains)})", param)


async def _http_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            for _hop in range(policy.max_redirects + 1):
                _check_host(url, policy, param)
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise RequestError(f"`{param}`: {_show(url)} redirects without a Location", param)
                        if policy.max_redirects == 0:
                            raise RequestError(f"`{param}`: {_show(url)} redirects and this server follows no "
                                               "redirects (VLLM_MEDIA_URL_ALLOW_REDIRECTS=0)", param)
                        url = urljoin(url, location)
                        continue
                    if response.status != 200:
                        raise RequestError(f"`{param}`: fetching {_show(url)} returned HTTP {response.status}", param)
                    return await _read_limited(response, policy.max_bytes, param)
    except aiohttp.ClientError as e:
        raise RequestError(f"`{param}`: fetching {_show(url)} failed: {type(e).__name__}: {e}", param) from None
    except ValueError as e:  # a malformed URL (bad IPv6 literal, an IDNA label too long ...); ours pass through
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"`{param}`: {_show(url)} is not a valid URL: {e}", param) from None
    raise RequestError(f"`{param}`: more than {policy.max_redirects} redirects", param)


async def _read_limited(response: Any, max_bytes: int, param: str) -> bytes:
    too_big = RequestError(f"`{param}`: the image is larger than this server's limit of {max_bytes} bytes", param)
    if (response.content_length or 0) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _show(url: str) -> str:
    return url if len(url) <= 100 else url[:97] + "..."


def decode_image(data: Any, limits: Limits, param: str = "image") -> Image.Image:
    """A loaded PIL image in RGB (or RGBA when it has transparency).

    Args:
        data: raw file bytes (any source above) or a PIL image (the offline API).
        limits: pixel limit and the bytes-per-pixel rule.
        param: the request field, named in errors.

    Returns:
        The decoded image. Undecodable data, an image above `limits.max_input_pixels`
        or a file too small for its declared size raise RequestError, checked on the
        header before the pixels are decoded.
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
            # PIL's own bomb check is a backstop; ours below runs first, on the header.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_pixels(width, height, limits, param)  # before decoding the pixels
            pixels = width * height
            if pixels > limits.free_input_pixels and pixels > len(data) * limits.max_pixels_per_byte:
                raise RequestError(
                    f"`{param}` declares {width}x{height} pixels in a {len(data)}-byte file (more than "
                    f"{limits.max_pixels_per_byte} pixels per byte); refused as a decompression bomb", param)
            image.load()
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise RequestError(f"`{param}` could not be decoded as an image: {e}", param) from e
    return image


def _check_pixels(width: int, height: int, limits: Limits, param: str) -> None:
    if width * height > limits.max_input_pixels:
        raise RequestError(
            f"`{param}` is {width}x{height} ({width * height} pixels), above the limit of "
            f"{limits.max_input_pixels} pixels",
            param,
        )
