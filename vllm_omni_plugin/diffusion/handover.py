"""Hand-overs from an earlier stage, waiting for their diffusion request, keyed by request id.

The orchestrator's input processor `put`s what the AR stage produced for a
request (BAGEL: its prefilled KV context; GLM-Image: its prior tokens and
grid); the diffusion pipeline `pop`s it in `prepare` for the same request id,
so the tensors live exactly as long as the request needs them. Keyed by id,
never by arrival order (ARCHITECTURE.md, principle 6).
"""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar


class Keyed(Protocol):
    request_id: str


T = TypeVar("T", bound=Keyed)


class HandOverStore(Generic[T]):
    """Thread-safe: the orchestrator puts on the event loop, the engine pops on its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, T] = {}

    def put(self, item: T) -> None:
        with self._lock:
            if item.request_id in self._items:
                raise ValueError(f"a hand-over for request {item.request_id!r} is already waiting")
            self._items[item.request_id] = item

    def pop(self, request_id: str) -> T | None:
        with self._lock:
            return self._items.pop(request_id, None)

    def discard(self, request_id: str) -> None:
        self.pop(request_id)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
