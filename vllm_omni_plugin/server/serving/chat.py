"""The image answer of /v1/chat/completions: the last user message is the prompt (its
`image_url` parts the input images of an edit), the rest of the body the generation fields;
the images come back as one choice of `image_url` parts -- or, with `stream: true`, as
vLLM's `chat.completion.chunk` server-sent events."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ...request import RequestError
from ...request.builder import CanonicalRequest
from ..encode import MIME, b64_images, encode_image
from .common import request_id, resolved_json, runtime, streamed_error
from .images import run_images

# Chat fields an image answer reads in its own way (`messages` -> prompt and images) or
# takes silently (the route checks `model`; `user` is metadata).
_CHAT_OWN = frozenset({"messages", "model", "user", "modalities", "stream", "stream_options"})
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


async def _canonical(request: Request, body: dict[str, Any]) -> CanonicalRequest:
    """The canonical image request of a chat body (messages -> prompt and input images)."""
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
    return await asyncio.to_thread(builder.build, fields, images, task=task, ignored=ignored)


def _image_parts(canon: CanonicalRequest, encoded: list[str]) -> list[dict[str, Any]]:
    mime = MIME[canon.output.output_format]
    return [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}} for b64 in encoded]


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage` (vLLM's rule: stream options only with `stream: true`)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("`stream_options` can only be given with `stream: true`", "stream_options")
    if not isinstance(options, dict) or not all(k in ("include_usage", "continuous_usage_stats") for k in options):
        raise RequestError('`stream_options` must be an object with `include_usage` (true / false)', "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise RequestError("`stream_options.include_usage` must be true or false", "stream_options")
    return usage


async def serve_chat_images(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """The image answer of a chat body (already checked: model, stream, messages, modalities).

    Args:
        request: the HTTP request.
        body: the chat body.

    Returns:
        the chat completion's JSON body: one choice whose content is the images.
    """
    _include_usage(body, stream=False)
    canon = await _canonical(request, body)
    result = await run_images(request, canon)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or runtime(request).model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _image_parts(canon, [d["b64_json"] for d in result["data"]])},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": dict(_NO_USAGE),
        "omni": result["omni"],
    }


# ---- streaming (`stream: true`) ----------------------------------------------------------------
_NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def stream_chat_images(request: Request, body: dict[str, Any]) -> StreamingResponse:
    """The image answer of a chat body as vLLM's streaming chat frames it: `text/event-stream` of
    `data: {chat.completion.chunk}` lines, then `data: [DONE]`.

    Chunks, in order: the role (`delta: {"role": "assistant", "content": ""}`, sent at once), the
    images (`delta.content`: the `image_url` parts of the unstreamed answer, the same bytes), the
    finish (`finish_reason: "stop"`, the answer's `omni` block as an extension field), with
    `stream_options.include_usage` a `usage` chunk (no choices). With `partial_images: k` (families
    that stream them), k partial-image chunks come between the role and the images: an empty delta
    and `omni_partial_image: {partial_image_index, content: [image_url parts]}`. The models served today write no
    text before an image (BAGEL's AR stage only prefills the prompt), so no text chunks come.
    A bad request or a full queue is a plain JSON error before any chunk; a failure after the
    stream started is a `data: {"error": ...}` chunk, then `data: [DONE]` (as vLLM's). A client
    that closes the connection aborts the request (at the engine's next step).
    """
    omni = runtime(request)
    include_usage = _include_usage(body, stream=True)
    canon = await _canonical(request, body)
    rid = request_id(request)
    queue: asyncio.Queue = asyncio.Queue()
    # partial images: only a family that declares them gets here with partial_images > 0 (check_request)
    partial = {"on_partial": lambda index, imgs: queue.put_nowait((index, imgs))} if canon.params.partial_images else {}
    work = asyncio.ensure_future(omni.stages.generate_image(canon.params, None, request_id=rid, **partial))
    work.add_done_callback(lambda _: queue.put_nowait(None))
    await asyncio.sleep(0)  # the work runs up to its submission: a refusal (QueueFull) is a JSON error
    if work.done() and work.exception() is not None:
        raise work.exception()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model") or omni.model_name}
    return StreamingResponse(_chunks(canon, work, queue, head, include_usage, rid), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _data(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _chunks(canon: CanonicalRequest, work: asyncio.Future, queue: asyncio.Queue, head: dict[str, Any],
                  include_usage: bool, rid: str) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        return _data({**head, "choices": [choice], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (item := await queue.get()) is not None:
            index, imgs = item  # a partial image round: an empty delta, the images in an extension field
            encoded = await asyncio.to_thread(lambda: [base64.b64encode(encode_image(img, canon.output)).decode("ascii")
                                                       for img in imgs])
            yield chunk({}, omni_partial_image={"partial_image_index": index, "content": _image_parts(canon, encoded)})
        try:
            output = work.result()
            encoded = await asyncio.to_thread(b64_images, output, canon.output)
        except Exception as exc:  # noqa: BLE001 -- the stream is open: the error is its last chunk
            yield _data(streamed_error(exc, rid, "chat image"))
            yield b"data: [DONE]\n\n"
            return
        yield chunk({"content": _image_parts(canon, encoded)})
        # `omni` (an extension field, as on the unstreamed answer): what ran, defaults filled in
        yield chunk({}, "stop", omni=resolved_json(canon.params, output.request_id, canon.ignored, output.dtypes))
        if include_usage:
            yield _data({**head, "choices": [], "usage": dict(_NO_USAGE)})
        yield b"data: [DONE]\n\n"
    finally:
        if not work.done():
            work.cancel()  # the client went away: the runtime aborts the request at the next step
