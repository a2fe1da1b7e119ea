"""The diffusion engine behind an asyncio server.

The engine is synchronous and step-wise (`DiffusionEngine.step`). `EngineLoop`
runs it in one background thread; the event loop submits requests, awaits
their results and aborts them. Guarantees:

* bounded: at most `max_queue` requests in the engine at once; one more is
  refused at once with `QueueFull` (HTTP 503), never queued without bound;
* progress: every denoise step of a request reaches its `on_progress`;
* cancellation: `abort(id)` (client gone, video deleted) stops the request at
  the next step boundary, and the engine drops its tensors there;
* every submitted request ends exactly once: finished, error or aborted. If
  `engine.step()` itself raises, every request in the engine fails with that
  error as its cause and the loop keeps serving; at shutdown the ones left
  fail with `EngineStopped`.

All bookkeeping of handles happens on the event loop thread (events cross over
through `call_soon_threadsafe`), so it needs no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any, Callable

from ..diffusion.engine import DiffusionEngine, EngineEvent
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams
from ..engine.errors import EngineStopped, GenerationFailed, QueueFull, RequestAborted, StageUnavailable
from ..engine.handles import ClientStats, PartialFn, ProgressFn, RequestHandle

# The request-ending exceptions are the engine clients' (engine/errors.py); importable from here as before.
__all__ = ["EngineLoop", "EngineStopped", "GenerationFailed", "QueueFull", "RequestAborted", "StageUnavailable",
           "RequestHandle", "LoopStats", "ProgressFn"]

logger = logging.getLogger("vllm.omni_plugin.server")


#: the loop's counters (the same as every engine client's; `restarts` stays 0: a thread is not restarted)
LoopStats = ClientStats


class EngineLoop:
    def __init__(self, engine: DiffusionEngine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stats = LoopStats()
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.step_observer: Callable[[float, int], None] | None = None

    # ---- lifecycle (event loop thread) -------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="omni-diffusion-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        for rid in list(self._handles):
            self.engine.abort(rid)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for handle in list(self._handles.values()):
            self._settle(handle, error=EngineStopped("the server shut down before this request finished"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    @property
    def running(self) -> int:
        return self.engine.num_running

    # ---- requests (event loop thread) --------------------------------------------
    def submit(
        self,
        params: ResolvedParams,
        on_progress: ProgressFn | None = None,
        prefix: str = "omni",
        request_id: str | None = None,
        stage_input: Any = None,
        on_partial: PartialFn | None = None,
    ) -> RequestHandle:
        """Queue a request; `request_id` names it where the caller already has (a multi-stage
        request's stages share it), `stage_input` is what the stage before handed over for it,
        `on_partial(index, images)` receives its partial images (on the event loop)."""
        if not self.alive:
            raise EngineStopped("the diffusion engine is not running")
        if len(self._handles) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"the server is at capacity ({len(self._handles)} requests in the diffusion engine, "
                f"--omni-max-queue {self.max_queue}); retry later"
            )
        rid = request_id or f"{prefix}-{next(self._ids)}-{int(time.time() * 1000)}"
        if rid in self._handles:
            raise ValueError(f"request id {rid!r} is already in the engine")
        handle = RequestHandle(rid, params, self._loop.create_future(), on_progress, on_partial=on_partial)
        self._handles[rid] = handle  # before the engine thread can report on it
        try:
            self.engine.add_request(rid, params, stage_input)
        except BaseException:
            del self._handles[rid]  # refused (a bad stage input): nothing to report on
            raise
        self.stats.submitted += 1
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        if request_id in self._handles:
            self.engine.abort(request_id)
            self._wake.set()

    async def result(self, handle: RequestHandle) -> DiffusionOutput:
        # shield: a cancelled awaiter must not cancel the shared future.
        return await asyncio.shield(handle.future)

    # ---- engine thread ---------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        engine.run_loop(lambda: self._stopping, self._wake, self._fail_all,
                        lambda events, elapsed: self._post(self._dispatch, events, elapsed))
        # Drain aborts so the engine releases every state before the thread ends.
        if engine.has_unfinished():
            engine.step()

    def _fail_all(self, exc: BaseException) -> list[EngineEvent]:
        ids = list(self._handles)  # a snapshot; only read here
        for rid in ids:
            self.engine.abort(rid)
        return [EngineEvent("error", rid, error=exc) for rid in ids]

    def _post(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    # ---- back on the event loop thread ----------------------------------------
    def _dispatch(self, events: list[EngineEvent], step_seconds: float) -> None:
        stepped = 0
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue  # already settled (e.g. failed by _fail_all, then aborted)
            if event.kind == "step":
                stepped += 1
                handle.step, handle.total = event.step, event.total
                if handle.on_progress is not None:
                    handle.on_progress(event.step, event.total)
            elif event.kind == "partial":
                if handle.on_partial is not None:
                    handle.on_partial(event.index, event.output.images)
            elif event.kind == "finished":
                self._settle(handle, output=event.output)
            elif event.kind == "aborted":
                self._settle(handle, error=RequestAborted(f"request {event.request_id} was aborted"))
            else:
                error = GenerationFailed(f"generation failed: {type(event.error).__name__}: {event.error}")
                error.__cause__ = event.error
                self._settle(handle, error=error)
        if stepped and self.step_observer is not None:
            self.step_observer(step_seconds, stepped)

    def _settle(self, handle: RequestHandle, output: DiffusionOutput | None = None, error: BaseException | None = None) -> None:
        self._handles.pop(handle.request_id, None)
        if handle.future.done():
            return
        if error is None:
            self.stats.finished += 1
            handle.future.set_result(output)
        else:
            if isinstance(error, RequestAborted):
                self.stats.aborted += 1
            else:
                self.stats.failed += 1
            handle.future.set_exception(error)
            # Nobody may await an aborted request's future; do not warn about it.
            handle.future.add_done_callback(lambda f: f.exception())
