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
images in the one choice. `stream: true` answers in vLLM's chunk framing
(server/serving/chat.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ...request import RequestError, check_messages, parse_json_object
from ...request.protocol import FIELDS, IGNORED_FIELDS, request_body
from ..serving.chat import serve_chat_images, stream_chat_images
from .common import check_request, json_body, json_response, omni_route, runtime

router = APIRouter()

# Generation / output fields read from a chat body; chat's own fields are not ours.
_CHAT_FIELDS = FIELDS - frozenset(IGNORED_FIELDS)
def _vllm_chat_fields() -> frozenset[str]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return frozenset(ChatCompletionRequest.model_fields)


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
    stream = check_request(request, body, streams=True, partials=False)
    check_messages(body.get("messages"))
    if _wants_text(request, body.get("modalities")):
        if request.app.state.omni_text_chat is None or not runtime(request).stages.text:
            if getattr(request.app.state, "omni_text_at", None):  # --omni-stage dit
                raise RequestError(f"this server runs {runtime(request).model_name}'s DiT stage only "
                                   f"(--omni-stage dit): send text chat to its AR server "
                                   f"({request.app.state.omni_text_at}), or send modalities [\"image\"]",
                                   "modalities")
            raise RequestError(f"{runtime(request).model_name} answers with images, not text (it makes images only): "
                               'omit `modalities` or send ["image"]', "modalities")
        field = _image_only_fields(request, body)[0]
        raise RequestError(f"`{field}` is a field of image answers; this request asks for text. "
                           'Send modalities: ["image"] for an image', field)
    if stream:
        return await stream_chat_images(request, body)
    return json_response(await serve_chat_images(request, body))
