"""POST /v1/chat/completions returning generated images as content parts.

The prompt is the text of the last user message; its `image_url` parts (fetched
under vLLM's media rules) are the input images of an edit. Generation fields
(size, n, seed, num_inference_steps, negative_prompt, ...) come in the body --
with the openai client through `extra_body` -- and mean what they mean on
/v1/images/generations: the same builder reads them. `n` is the number of
images in the one choice. Text-only answers (AR models) arrive with the
multi-stage server, which hands such requests to vLLM's own chat route.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ...request import RequestError
from ...request.builder import FIELDS, IGNORED_FIELDS
from ..encode import MIME
from .common import check_request, json_body, json_response, omni_route, runtime
from .images import run_images

router = APIRouter()

# Generation / output fields read from a chat body; chat's own fields are not ours.
_CHAT_FIELDS = FIELDS - frozenset(IGNORED_FIELDS)


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


@router.post("/v1/chat/completions")
@omni_route("chat.completions")
async def chat_completions(request: Request):
    body = await json_body(request)
    check_request(request, body)
    prompt, images = await _prompt_and_images(request, body.get("messages"))
    fields = {k: v for k, v in body.items() if k in _CHAT_FIELDS}
    if "prompt" in fields:
        raise RequestError("the prompt comes from `messages`; do not also send `prompt`", "prompt")
    fields["prompt"] = prompt
    task = "edit" if images else "image"
    canon = await asyncio.to_thread(runtime(request).builder.build, fields, images, task=task, strict=False)
    result = await run_images(request, canon)
    mime = MIME[canon.output.output_format]
    parts = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{d['b64_json']}"}} for d in result["data"]]
    return json_response(
        {
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
    )
