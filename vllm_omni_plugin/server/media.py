"""Image inputs given by URL: vLLM's media settings, fetched by the request layer's one image path.

What may be fetched keeps vLLM's meaning: http(s) URLs (limited to
--allowed-media-domains when set), base64 `data:` URLs, and `file:` URLs only
under --allowed-local-media-path; VLLM_IMAGE_FETCH_TIMEOUT and
VLLM_MEDIA_URL_ALLOW_REDIRECTS as in vLLM. The fetch itself is
`request.image_input.fetch_image_bytes` (allowlist checked at every redirect
hop, one deadline for the whole fetch); it returns bytes, which the request
builder decodes like an upload. Anything refused is a 400 for the client.
"""

from __future__ import annotations

from typing import Any

from vllm import envs

from ..request import MediaPolicy, fetch_image_bytes
from .config import OmniServerConfig


class MediaFetcher:
    def __init__(self, config: OmniServerConfig) -> None:
        self.policy = MediaPolicy.create(
            config.allowed_local_media_path,
            config.allowed_media_domains,
            timeout_s=envs.VLLM_IMAGE_FETCH_TIMEOUT,
            allow_redirects=envs.VLLM_MEDIA_URL_ALLOW_REDIRECTS,
            max_bytes=config.limits.max_input_bytes,
        )

    async def fetch_image(self, url: Any, param: str = "image_url") -> bytes:
        """The image file behind `url` (bytes; decoded and checked by the request builder)."""
        return await fetch_image_bytes(url, self.policy, param)
