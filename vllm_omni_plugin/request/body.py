"""Request bodies and scalar values, checked before anything else sees them.

Every JSON body goes through `parse_json_object`, and every scalar a route
reads goes through `finite_float` / `checked_int` / `checked_text`, so that
what reaches the request builder (and later the engine, the job table and the
JSON encoder of the response) is a value Python and JSON can both round-trip:

* size: at most `Limits.max_body_bytes` (counted while reading, see
  `BodyTooLarge`), then at most `Limits.max_json_depth` levels of arrays /
  objects -- a few thousand `[` otherwise reach the C parser's recursion limit;
* numbers: `NaN`, `Infinity`, `-Infinity` and literals that overflow to
  infinity (`1e999`) are refused as JSON numbers and as strings; integer
  literals longer than 64 digits are refused before `int()` sees them
  (Python refuses > 4300 digits with a bare ValueError);
* text: every string, keys included, must be encodable as UTF-8 -- JSON's
  `"\\ud800"` escape yields a lone surrogate that breaks the response encoder
  (and any log line) after the work is done.

Everything raises `RequestError` (a 400 naming the field where one is known).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .limits import Limits, RequestError

_INT_LITERAL = re.compile(r"^\s*[+-]?\d{1,64}\s*$")
_MAX_INT_DIGITS = 64


def _refuse_constant(name: str) -> Any:
    raise RequestError(f"the request body contains {name}; numbers must be finite")


def _finite_literal(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"the number {text[:40]} overflows; numbers must be finite")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise RequestError(f"an integer in the request body has more than {_MAX_INT_DIGITS} digits")
    return int(text)


def parse_json_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    """A request body -> its JSON object, every limit above checked.

    Args:
        raw: the body as received (UTF-8).
        limits: the server's limits (body bytes, JSON depth).

    Returns:
        The parsed object (a dict); its strings are valid Unicode, its numbers finite.
    """
    if len(raw) > limits.max_body_bytes:
        raise BodyTooLarge(limits.max_body_bytes)
    try:
        body = json.loads(raw or b"null", parse_constant=_refuse_constant, parse_float=_finite_literal,
                          parse_int=_bounded_int)
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {limits.max_json_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_json_value(body, limits.max_json_depth)
    return body


def check_json_value(value: Any, max_depth: int) -> None:
    """Walk a parsed JSON value (iteratively): depth within `max_depth`, every string valid UTF-8.

    Args:
        value: a value as `json.loads` returns it.
        max_depth: the most levels of nested arrays / objects allowed.
    """
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise RequestError(f"the request body nests deeper than {max_depth} levels", field)
            if isinstance(item, dict):
                for key, child in item.items():
                    checked_text(key, key if field is None else field)
                    stack.append((child, depth + 1, key if field is None else field))
            else:
                stack.extend((child, depth + 1, field) for child in item)
        elif isinstance(item, str):
            checked_text(item, field)
        elif isinstance(item, float) and not math.isfinite(item):
            raise RequestError("numbers must be finite", field)


def checked_text(value: str, name: str | None) -> str:
    """`value` if it encodes as UTF-8 (no lone surrogates), else a 400 naming `name`."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"`{name}` is not valid Unicode text (it contains a lone surrogate)"
                               if name else "the request body contains text that is not valid Unicode "
                               "(a lone surrogate)", name) from None
    return value


def finite_float(name: str, value: Any, bound: float | None = None) -> float:
    """A number (JSON number or numeric string) that is finite and, given `bound`, within +-bound.

    Args:
        name: the request field (for the error's `param`).
        value: what the client sent.
        bound: the largest magnitude allowed (None: any finite value).

    Returns:
        The value as a float.
    """
    if isinstance(value, bool):
        raise RequestError(f"`{name}` must be a number, got {value!r}", name)
    if isinstance(value, (int, float)):
        number = float(value) if not isinstance(value, int) or abs(value) < 1e300 else math.inf
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            raise RequestError(f"`{name}` must be a number, got {value!r}", name) from None
    else:
        raise RequestError(f"`{name}` must be a number, got {_short(value)}", name)
    if not math.isfinite(number):
        raise RequestError(f"`{name}` must be a finite number, got {_short(value)}", name)
    if bound is not None and abs(number) > bound:
        raise RequestError(f"`{name}` must be within [-{bound:g}, {bound:g}], got {_short(value)}", name)
    return number


def checked_int(name: str, value: Any) -> int:
    """An integer: a JSON integer, an integral float, or a string of at most 64 digits.

    Args:
        name: the request field (for the error's `param`).
        value: what the client sent.

    Returns:
        The value as an int.
    """
    if isinstance(value, bool):
        raise RequestError(f"`{name}` must be an integer, got {value!r}", name)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_LITERAL.match(value):
        return int(value)
    raise RequestError(f"`{name}` must be an integer, got {_short(value)}", name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class BodyTooLarge(RequestError):
    """A body above `Limits.max_body_bytes` (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {limit} bytes", None, 413)
