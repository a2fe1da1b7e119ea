"""The progress bar of `Omni.generate` (`use_tqdm=True`, the default, like `LLM.generate`).

One tqdm bar over the requests of a call ("Generating": requests finished / submitted), with the
denoising steps of all of them in its postfix ("steps 37/100, 12.3 steps/s"). Requests report their
step count with their first step, so the step total grows as requests start.

It is fed by the engine's events (inline diffusion: `EngineEvent`s) or by per-request progress
callbacks (the multi-stage orchestrators' `on_progress(step, total)`), and passes every event on to
the caller's own `on_event`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

_REFRESH_S = 0.1  # redraw the postfix at most this often (steps can be milliseconds apart on a GPU)


class GenerateProgress:
    """Progress of one `generate` call.

    Args:
        num_requests: requests submitted in the call.
        enabled: False: no bar (`use_tqdm=False`); events still reach `on_event`.
        on_event: the caller's event callback, called with every engine event after the bar.
    """

    def __init__(self, num_requests: int, enabled: bool = True, on_event: Callable[[Any], None] | None = None) -> None:
        self._on_event = on_event
        self._lock = threading.Lock()
        self._steps: dict[str, tuple[int, int]] = {}  # request id -> (steps done, steps in all)
        self._finished: set[str] = set()
        self._started = time.perf_counter()
        self._drawn = 0.0
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=num_requests, desc="Generating", unit="req", dynamic_ncols=True)

    @property
    def wants_events(self) -> bool:
        """Whether step events have a reader (the bar or the caller's `on_event`)."""
        return self._bar is not None or self._on_event is not None

    def on_event(self, event: Any) -> None:
        """An engine event: "step" events advance the steps, final ones ("finished", "aborted",
        "error") the requests; then the caller's `on_event`."""
        if event.kind == "step":
            self.step(event.request_id, event.step, event.total)
        elif event.kind == "partial":
            pass
        else:
            self.finished(event.request_id)
        if self._on_event is not None:
            self._on_event(event)

    def progress_for(self, request_id: str) -> Callable[[int, int], None]:
        """An `on_progress(step, total)` callback for one request (multi-stage orchestrators)."""
        return lambda step, total: self.step(request_id, step, total)

    def step(self, request_id: str, step: int, total: int) -> None:
        with self._lock:
            self._steps[request_id] = (step, total)
            self._draw(force=False)

    def finished(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._finished:
                return
            self._finished.add(request_id)
            done, total = self._steps.get(request_id, (0, 0))
            self._steps[request_id] = (total, total)  # a finished request ran all of its steps
            if self._bar is not None:
                self._bar.update(1)
            self._draw(force=True)

    def _draw(self, force: bool) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < _REFRESH_S:
            return
        self._drawn = now
        done = sum(d for d, _ in self._steps.values())
        total = sum(t for _, t in self._steps.values())
        rate = done / max(now - self._started, 1e-9)
        self._bar.set_postfix_str(f"steps {done}/{total}, {rate:.1f} steps/s", refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "GenerateProgress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
