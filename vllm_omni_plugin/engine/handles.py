"""A submitted request's handle and a client's counters (shared by every engine client)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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


@dataclass
class ClientStats:
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    aborted: int = 0
    rejected: int = 0
    restarts: int = 0
