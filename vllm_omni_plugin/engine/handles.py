"""A submitted request's handle and a client's counters (shared by every engine client)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..diffusion.params import ResolvedParams

ProgressFn = Callable[[int, int], None]
#: a partial image of a running request: (its 0-based index, one image per output row)
PartialFn = Callable[[int, list[Any]], None]


@dataclass
class RequestHandle:
    """One submitted request; `future` settles exactly once."""

    request_id: str
    params: ResolvedParams
    future: Any  # concurrent.futures.Future (engine clients) or asyncio.Future (EngineLoop)
    on_progress: ProgressFn | None = None
    loop: asyncio.AbstractEventLoop | None = None  # progress is called on this loop when set
    #: called with each partial image (requests with `params.partial_images`), like on_progress
    on_partial: PartialFn | None = None
    step: int = 0
    total: int = 0
    submitted: float = field(default_factory=time.monotonic)


class ClientBase:
    """What every engine client shares: its handles in flight, and `submit` as one `submit_many`."""

    _handles: dict[str, RequestHandle]

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def submit(self, params: ResolvedParams, on_progress: ProgressFn | None = None, prefix: str = "omni",
               request_id: str | None = None, stage_input: Any = None,
               on_partial: "PartialFn | None" = None) -> RequestHandle:
        """Queue one resolved request; see `submit_many`."""
        return self.submit_many([(params, stage_input)], on_progress, prefix, [request_id], on_partial)[0]

    def submit_many(self, requests: Sequence[tuple[ResolvedParams, Any]],
                    on_progress: ProgressFn | Sequence[ProgressFn | None] | None = None,
                    prefix: str = "omni", request_ids: Sequence[str | None] | None = None,
                    on_partial: "PartialFn | Sequence[PartialFn | None] | None" = None) -> list[RequestHandle]:
        raise NotImplementedError


@dataclass
class ClientStats:
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    aborted: int = 0
    rejected: int = 0
    restarts: int = 0
