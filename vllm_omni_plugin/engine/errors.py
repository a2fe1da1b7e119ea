"""How a request to a diffusion engine can end other than with its output.

The same exceptions whichever client runs the engine (in this process or in
the engine-core process); server/errors.py maps them to HTTP statuses.
"""

from __future__ import annotations


class QueueFull(RuntimeError):
    """The engine already holds `max_queue` requests (503: retry later)."""


class EngineStopped(RuntimeError):
    """The server shut down before the request finished."""


class StageUnavailable(EngineStopped):
    """A stage's engine is down (its process died and is being restarted): 503 until it is back."""


class RequestAborted(RuntimeError):
    """The request was aborted (client disconnected, video deleted)."""


class GenerationFailed(RuntimeError):
    """The engine reported an error for this request; `__cause__` is the original."""
