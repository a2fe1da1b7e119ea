"""The image answer of /v1/chat/completions: the last user message is the prompt (its
`image_url` parts the input images of an edit), the rest of the body the generation fields;
the images come back as one choice of `image_url` parts."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import Request

from ...request import RequestError
from ..encode import MIME
from .common import runtime
from .images import run_images

# Chat fields an image answer reads in its own way (`messages` -> prompt and images) or
# takes silently (the route checks `model`; `user` is metadata).
_CHAT_OWN = frozenset({"messages", "model", "user", "modalities", "stream"})
# Chat's sampling fields: an image answer accepts them without acting on them (OpenAI
# clients send them by default) and reports them in `omni.ignored`; `n` and `seed` are
# image fields too. Any other chat field (tools, logprobs ...) is refused as unknown.
_TEXT_SAMPLING = frozenset({"max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k",
                            "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop"})


async def _prompt_and_images(request: Request, messages: Any) -> tuple[str, list[Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", "messages")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise RequestError("`messages` has no user message to take the prompt from", "messages")
    content = user[-1].get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError("a user message's `content` must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            images.append(await runtime(request).media.fetch_image(url, "messages.content.image_url"))
        else:
            raise RequestError(f"unsupported content part type {kind!r} (text and image_url are)", "messages")
    return "\n".join(texts), images


async def serve_chat_images(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """The image answer of a chat body (already checked: model, stream, messages, modalities).

    Args:
        request: the HTTP request.
        body: the chat body.

    Returns:
        the chat completion's JSON body: one choice whose content is the images.
    """
    builder = runtime(request).builder
    prompt, images = await _prompt_and_images(request, body.get("messages"))
    if "prompt" in body:
        raise RequestError("the prompt comes from `messages`; do not also send `prompt`", "prompt")
    # anything but chat's own and sampling fields: the builder checks it against the model's declaration
    ignored = tuple(k for k in body if k in _TEXT_SAMPLING and body[k] is not None)
    fields = {k: v for k, v in body.items() if k not in _CHAT_OWN and k not in _TEXT_SAMPLING}
    fields["prompt"] = prompt
    fields["model"] = body.get("model")
    task = "edit" if images else "image"
    canon = await asyncio.to_thread(builder.build, fields, images, task=task, ignored=ignored)
    result = await run_images(request, canon)
    mime = MIME[canon.output.output_format]
    parts = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{d['b64_json']}"}} for d in result["data"]]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or runtime(request).model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": parts},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "omni": result["omni"],
    }
