"""POST /v1/chat/completions: image answers, and text answers of multi-stage models.

What the answer is: `modalities` (OpenAI's chat field). `["image"]` (or any
list with "image") asks for images; `["text"]` for text. Left out, a model
with an AR stage (BAGEL) answers in text, a diffusion-only model with images.

Image answers: the prompt is the text of the last user message; its
`image_url` parts (fetched under vLLM's media rules) are the input images of
an edit. Generation fields (size, n, seed, num_inference_steps,
negative_prompt, the model's own knobs ...) come in the body -- with the
openai client through `extra_body` -- and mean what they mean on
/v1/images/generations: the same builder reads them. `n` is the number of
images in the one choice.

Text answers (AR stage: text2text, img2text): the whole conversation, its
`image_url` parts fetched under the same media rules and checked by the same
builder, rendered by the AR engine's own vLLM renderer (the checkpoint's chat
template, as plain `vllm serve` renders it), sampled with the OpenAI sampling
fields (request > the AR stage's default_sampling_params > vLLM's defaults).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ...request import RequestError, check_messages
from ...request.builder import FIELDS, IGNORED_FIELDS
from ..encode import MIME
from .common import check_request, json_body, json_response, omni_route, runtime, until_disconnect
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


def _wants_text(request: Request, modalities: Any) -> bool:
    if modalities is None:
        return runtime(request).stages.text
    if not isinstance(modalities, list) or not modalities or not all(m in ("text", "image") for m in modalities):
        raise RequestError('`modalities` must be a non-empty list of "text" / "image"', "modalities")
    return "image" not in modalities


@router.post("/v1/chat/completions")
@omni_route("chat.completions")
async def chat_completions(request: Request):
    body = await json_body(request)
    check_request(request, body)
    check_messages(body.get("messages"))
    if _wants_text(request, body.get("modalities")):
        return await _text_answer(request, body)
    return await _image_answer(request, body)


async def _image_answer(request: Request, body: dict[str, Any]):
    builder = runtime(request).builder
    prompt, images = await _prompt_and_images(request, body.get("messages"))
    fields = {k: v for k, v in body.items() if k in _CHAT_FIELDS or k in builder.extensions}
    if "prompt" in fields:
        raise RequestError("the prompt comes from `messages`; do not also send `prompt`", "prompt")
    fields["prompt"] = prompt
    task = "edit" if images else "image"
    canon = await asyncio.to_thread(builder.build, fields, images, task=task, strict=False)
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


async def _conversation(request: Request, messages: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages with each `image_url` part fetched; (messages with image slots, fetched images in order)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", "messages")
    out, images = [], []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("each message must be an object with a `role`", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(dict(message))
            continue
        if not isinstance(content, list):
            raise RequestError("a message's `content` must be a string or a list of parts", "messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text") or ""})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                images.append(await runtime(request).media.fetch_image(url, "messages.content.image_url"))
                parts.append({"type": "image_pil", "image_pil": len(images) - 1})  # filled once checked
            else:
                raise RequestError(f"unsupported content part type {kind!r} (text and image_url are)", "messages")
        out.append({**message, "content": parts})
    if not any(m["role"] == "user" for m in out):
        raise RequestError("`messages` has no user message", "messages")
    return out, images


async def _text_answer(request: Request, body: dict[str, Any]):
    omni = runtime(request)
    messages, fetched = await _conversation(request, body.get("messages"))
    text = await asyncio.to_thread(omni.builder.build_text, body, fetched)
    for message in messages:
        for part in message["content"] if isinstance(message.get("content"), list) else ():
            if part["type"] == "image_pil":
                part["image_pil"] = text.images[part["image_pil"]]
    stages = omni.stages
    sampling = stages.text_params(text.sampling)
    prompt = await stages.render(messages)
    final = await until_disconnect(request, stages.generate_text(prompt, sampling))
    completion = sum(len(o.token_ids) for o in final.outputs)
    prompt_tokens = len(final.prompt_token_ids or ())
    return json_response(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or omni.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason or "stop",
                    "logprobs": None,
                }
                for i, o in enumerate(final.outputs)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "omni": {"request_id": final.request_id, "sampling": dict(text.sampling)},
        }
    )
