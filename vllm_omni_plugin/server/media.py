"""Image inputs given by URL follow vLLM's media rules.

vLLM's `MediaConnector` decides what may be fetched: http(s) URLs (limited to
--allowed-media-domains when set), base64 `data:` URLs, and `file:` URLs only
under --allowed-local-media-path. Anything it refuses is a 400 for the client.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from PIL import Image
from vllm.exceptions import VLLMError
from vllm.multimodal.media.connector import MediaConnector

from ..request import RequestError
from .config import OmniServerConfig


class MediaFetcher:
    def __init__(self, config: OmniServerConfig) -> None:
        self.connector = MediaConnector(
            allowed_local_media_path=config.allowed_local_media_path,
            allowed_media_domains=list(config.allowed_media_domains) if config.allowed_media_domains else None,
        )

    async def fetch_image(self, url: Any, param: str = "image_url") -> Image.Image:
        if not isinstance(url, str) or not url:
            raise RequestError(f"`{param}` must be a non-empty URL string", param)
        try:
            # image_mode=None: keep alpha (layered models take RGBA); the request
            # builder normalizes modes for every input the same way.
            media = await self.connector.fetch_image_async(url, image_mode=None)
        except (ValueError, RuntimeError, NotImplementedError, VLLMError, aiohttp.ClientError, OSError) as e:
            raise RequestError(f"`{param}` could not be loaded: {e}", param) from e
        return getattr(media, "media", media)
