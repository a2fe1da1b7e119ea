"""`LocalEngineClient`: the engine in the caller's own process and thread (offline `Omni`'s default).

The same calls as `EngineCoreClient` (resolve, submit / submit_many, abort,
wait, stop, info), so `Omni` has one code path for both; `wait` runs engine
steps in the calling thread until the request is done -- no threads, no second
process: what a notebook or a debugger wants, and the pipeline object stays
reachable (`engine.pipeline`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
from typing import Any, Sequence

from ..diffusion.engine import DiffusionEngine
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from .handles import ClientBase, ClientStats, PartialFn, ProgressFn, RequestHandle
from .errors import GenerationFailed, QueueFull, RequestAborted
from .spec import PipelineInfo


class LocalEngineClient(ClientBase):
    """Args: engine: the DiffusionEngine to drive; max_queue: requests in it at once."""

    def __init__(self, engine: DiffusionEngine, max_queue: int | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.info = PipelineInfo.of(engine)
        self.stats = ClientStats()
        self.status = "running"
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()

    @property
    def alive(self) -> bool:
        return self.status == "running"

    def health(self) -> str | None:
        return None if self.alive else "the diffusion engine is stopped"

    def resolve(self, request: SamplingParams, stage_defaults: Any = None) -> ResolvedParams:
        """The pipeline's own resolution with the engine's stage defaults (raises what it raises)."""
        return self.engine.pipeline.resolve(request, stage_defaults or self.engine.stage_defaults)

    def submit_many(self, requests: Sequence[tuple[ResolvedParams, Any]],
                    on_progress: ProgressFn | Sequence[ProgressFn | None] | None = None,
                    prefix: str = "omni", request_ids: Sequence[str | None] | None = None,
                    on_partial: PartialFn | Sequence[PartialFn | None] | None = None) -> list[RequestHandle]:
        """As `EngineCoreClient.submit_many`; progress and partial images are called in the thread that waits."""
        if self.max_queue is not None and len(self._handles) + len(requests) > self.max_queue:
            self.stats.rejected += len(requests)
            raise QueueFull(f"{len(self._handles)} requests in the engine, at most {self.max_queue}")
        progress = list(on_progress) if isinstance(on_progress, (list, tuple)) else [on_progress] * len(requests)
        partials = list(on_partial) if isinstance(on_partial, (list, tuple)) else [on_partial] * len(requests)
        ids = [rid or f"{prefix}-{next(self._ids)}" for rid in (request_ids or [None] * len(requests))]
        results = self.engine.add_requests(
            [(rid, params, stage_input) for rid, (params, stage_input) in zip(ids, requests)])
        handles = []
        for rid, result, fn, partial in zip(ids, results, progress, partials):
            if isinstance(result, Exception):
                raise result
            handle = RequestHandle(rid, result, concurrent.futures.Future(), fn, on_partial=partial)
            self._handles[rid] = handle
            handles.append(handle)
        self.stats.submitted += len(handles)
        return handles

    def abort(self, request_id: str) -> None:
        if request_id in self._handles:
            self.engine.abort(request_id)

    def wait(self, handle: RequestHandle, timeout: float | None = None) -> DiffusionOutput:
        """Run engine steps here until the request is done; its output, or its error raised."""
        while not handle.future.done():
            if not self.engine.has_unfinished():
                raise RuntimeError(f"request {handle.request_id} is not in the engine")
            for event in self.engine.step():
                self._dispatch(event)
        return handle.future.result()

    def _dispatch(self, event: Any) -> None:
        handle = self._handles.get(event.request_id)
        if handle is None:
            return
        if event.kind == "step":
            handle.step, handle.total = event.step, event.total
            if handle.on_progress is not None:
                handle.on_progress(event.step, event.total)
            return
        if event.kind == "partial":
            if handle.on_partial is not None:
                handle.on_partial(event.index, event.output.images)
            return
        del self._handles[event.request_id]
        if event.kind == "finished":
            self.stats.finished += 1
            handle.future.set_result(event.output)
        elif event.kind == "aborted":
            self.stats.aborted += 1
            handle.future.set_exception(RequestAborted(f"request {event.request_id} was aborted"))
        else:
            self.stats.failed += 1
            error = GenerationFailed(f"generation failed: {type(event.error).__name__}: {event.error}")
            error.__cause__ = event.error
            handle.future.set_exception(error)

    def stop(self) -> None:
        """Release what the engine owns (a multi-GPU DiT's worker ranks); idempotent."""
        if self.status != "stopped":
            self.status = "stopped"
            self.engine.close()
