"""POST /v1/chat/completions: one route, the requested output decides who answers.

What the answer is: `modalities` (OpenAI's chat field). `["image"]` (or any
list with "image") asks for images; `["text"]` for text. Left out, a model
with an AR stage (BAGEL) answers in text, a diffusion-only model with images.

Text answers (AR stage: text2text, img2text) are vLLM's: the request goes on,
untouched, to the chat handler of vLLM's own server (its renderer and chat
template, streaming, logprobs, tools, sampling defaults and checks). Only the
omni generation fields are refused there (400 pointing at `modalities`), so
an image request that forgot `modalities` is not answered in text.

Image answers: the prompt is the text of the last user message; its
`image_url` parts (fetched under vLLM's media rules) are the input images of
an edit. Generation fields (size, n, seed, num_inference_steps,
negative_prompt, the model's own knobs ...) come in the body -- with the
openai client through `extra_body` -- and mean what they mean on
/v1/images/generations: the same builder reads them. `n` is the number of
images in the one choice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ...request import RequestError, check_messages, parse_json_object
from ...request.protocol import FIELDS, IGNORED_FIELDS, request_body
from ..encode import MIME
from .common import check_request, json_body, json_response, omni_route, runtime
from .images import run_images

router = APIRouter()

# Generation / output fields read from a chat body; chat's own fields are not ours.
_CHAT_FIELDS = FIELDS - frozenset(IGNORED_FIELDS)
# Chat fields an image answer reads in its own way (`messages` -> prompt and images) or
# takes silently (the route checks `model`; `user` is metadata).
_CHAT_OWN = frozenset({"messages", "model", "user", "modalities", "stream"})
# Chat's sampling fields: an image answer accepts them without acting on them (OpenAI
# clients send them by default) and reports them in `omni.ignored`; `n` and `seed` are
# image fields too. Any other chat field (tools, logprobs ...) is refused as unknown.
_TEXT_SAMPLING = frozenset({"max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k",
                            "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop"})


def _vllm_chat_fields() -> frozenset[str]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return frozenset(ChatCompletionRequest.model_fields)


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


def _image_only_fields(request: Request, body: dict[str, Any]) -> list[str]:
    """Fields of `body` that only an image answer reads (vLLM's chat request does not know them)."""
    ours = _CHAT_FIELDS | frozenset(runtime(request).builder.knobs)
    return sorted(k for k in body if k in ours and k not in _vllm_chat_fields())


@router.post("/v1/chat/completions", openapi_extra={"requestBody": request_body("/v1/chat/completions")})
async def chat_completions(request: Request):
    if await _vllm_answers(request):
        return await request.app.state.omni_text_chat(request)  # vLLM's own chat handler
    return await _omni_chat(request)


async def _vllm_answers(request: Request) -> bool:
    """Whether this is a text request vLLM can take as it is (anything else goes to `_omni_chat`,
    which answers images or refuses with a 400 that says why)."""
    if request.app.state.omni_text_chat is None or not runtime(request).stages.text:
        return False  # no text answers here (GLM-Image's AR stage only makes image tokens)
    try:
        # the request layer's checks (depth, size, finite numbers, Unicode): a body they refuse gets
        # the omni route's 400, not a RecursionError inside a JSON parser
        body = parse_json_object(await request.body(), runtime(request).config.limits)
    except RequestError:
        return False
    try:
        wants_text = _wants_text(request, body.get("modalities"))
    except RequestError:
        return False
    return wants_text and not _image_only_fields(request, body)


@omni_route("chat.completions")
async def _omni_chat(request: Request):
    body = await json_body(request)
    check_request(request, body)
    check_messages(body.get("messages"))
    if _wants_text(request, body.get("modalities")):
        if request.app.state.omni_text_chat is None or not runtime(request).stages.text:
            raise RequestError(f"{runtime(request).model_name} answers with images, not text (it makes images only): "
                               'omit `modalities` or send ["image"]', "modalities")
        field = _image_only_fields(request, body)[0]
        raise RequestError(f"`{field}` is a field of image answers; this request asks for text. "
                           'Send modalities: ["image"] for an image', field)
    return await _image_answer(request, body)


async def _image_answer(request: Request, body: dict[str, Any]):
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
