"""The structure of a chat body's `messages`, checked before a route walks it.

OpenAI's shape, the parts this server reads: each message an object with a
string `role`; `content` a string, null, or a list of parts, each
`{"type": "text", "text": str}` or `{"type": "image_url", "image_url": {"url": str}}`.
A wrong type anywhere is a 400 naming `messages` (not a TypeError deep in a
route, and not an image fetch started for a body that is refused anyway).
"""

from __future__ import annotations

from typing import Any

from .limits import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = ("text", "image_url")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate `messages`; returns it unchanged.

    Args:
        messages: the body's `messages` value.

    Returns:
        The list of message objects.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object with a `role` of {', '.join(ROLES)}", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", "messages")
        for j, part in enumerate(content):
            _check_part(part, f"messages[{i}].content[{j}]")
    return messages


def _check_part(part: Any, where: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string", "messages")
    elif kind == "image_url":
        ref = part.get("image_url")
        if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
            raise RequestError(f'{where} must be {{"type": "image_url", "image_url": {{"url": URL}}}}', "messages")
    else:
        raise RequestError(f"{where}: unsupported content part type {kind!r} (text and image_url are)", "messages")
