"""The diffusion engine: a request queue and a step-level batching scheduler.

Each `step()`:
  1. applies aborts (at this step boundary; the request's tensors are dropped),
  2. admits waiting requests (`prepare_many`: text encoding -- one text-encoder
     call for all requests admitted together where the pipeline can --, noise,
     timesteps),
  3. picks ONE group of running requests that can share a forward (equal
     `pipeline.batch_key`: same model, latent layout, expert, CFG-compatible),
     least recently served group first, so a long video and short images
     alternate instead of one starving the other,
  4. fills the batch in arrival order up to the token budget
     (`max_batch_tokens` image+text tokens over all rows and CFG branches; a
     request bigger than the budget still runs, alone),
  5. runs denoise_step + scheduler_step for that batch, emits a progress event
     per request, and decodes requests that finished.

Monolithic (generic) pipelines run one whole request per step.
No vLLM here: this runs on a bare GPU box (ARCHITECTURE.md, principle 3).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .interface import DiffusionPipelineBase, StepwisePipeline
from .output import DiffusionOutput
from .params import ResolvedParams, SamplingParams
from .state import DiffusionState


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 65536
    max_running: int = 64


@dataclass
class EngineEvent:
    """kind: "step" (progress), "finished" (output set), "aborted", "error" (error set)."""

    kind: str
    request_id: str
    step: int = 0
    total: int = 0
    output: DiffusionOutput | None = None
    error: BaseException | None = None


@dataclass
class _Request:
    request_id: str
    params: ResolvedParams
    arrival: int
    state: DiffusionState | None = None


@dataclass
class EngineStats:
    forwards: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class DiffusionEngine:
    def __init__(
        self,
        pipeline: DiffusionPipelineBase,
        config: EngineConfig | None = None,
        stage_defaults: SamplingParams | Mapping[str, Any] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        if stage_defaults is not None:
            # A default the model never reads is a deployment mistake: refused once, here.
            layer = stage_defaults if isinstance(stage_defaults, SamplingParams) else SamplingParams.from_dict(stage_defaults)
            pipeline.capabilities.check_fields(set(layer.set_fields()) - {"images"}, "stage defaults")
        self.stage_defaults = stage_defaults
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, _Request] = OrderedDict()
        self._running: OrderedDict[str, _Request] = OrderedDict()
        self._aborts: set[str] = set()
        self._arrivals = itertools.count()
        self._last_served: dict[Any, int] = {}
        self._step_no = 0

    # ---- client side (thread-safe) ---------------------------------------------
    def add_request(self, request_id: str, params: SamplingParams | ResolvedParams) -> ResolvedParams:
        """Queue a request. Parameters resolve here, so bad input fails now, to the caller."""
        resolved = params if isinstance(params, ResolvedParams) else self.pipeline.resolve(params, self.stage_defaults)
        with self._lock:
            if request_id in self._waiting or request_id in self._running:
                raise ValueError(f"request id {request_id!r} is already in the engine")
            self._waiting[request_id] = _Request(request_id, resolved, next(self._arrivals))
        return resolved

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its memory is released there."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- engine loop -----------------------------------------------------------
    def step(self) -> list[EngineEvent]:
        events = self._apply_aborts()
        events += self._admit()
        if isinstance(self.pipeline, StepwisePipeline):
            events += self._denoise_one_batch()
        else:
            events += self._run_one_whole()
        self._step_no += 1
        return events

    def run(self, on_event: Callable[[EngineEvent], None] | None = None) -> dict[str, EngineEvent]:
        """Step until the queue is empty; returns each request's final event."""
        final: dict[str, EngineEvent] = {}
        while self.has_unfinished():
            for event in self.step():
                if on_event is not None:
                    on_event(event)
                if event.kind != "step":
                    final[event.request_id] = event
        return final

    def _apply_aborts(self) -> list[EngineEvent]:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            dropped = [self._waiting.pop(r, None) or self._running.pop(r, None) for r in aborts]
        events = []
        for req in dropped:
            if req is None:
                continue
            if req.state is not None:
                req.state.release()
                req.state = None
            events.append(EngineEvent("aborted", req.request_id))
        return events

    def _admit(self) -> list[EngineEvent]:
        """Move waiting requests to running; all admitted in this step are prepared in one call."""
        with self._lock:
            room = self.config.max_running - len(self._running)
            admitted = [self._waiting.popitem(last=False)[1] for _ in range(min(room, len(self._waiting)))]
        if not admitted:
            return []
        if isinstance(self.pipeline, StepwisePipeline):
            try:
                states = self.pipeline.prepare_many([r.params for r in admitted], [r.request_id for r in admitted])
            except Exception as exc:  # a shared step (one text-encoder call) failed: each request ends in it
                states = [exc] * len(admitted)
        else:
            states = [None] * len(admitted)
        events = []
        for req, state in zip(admitted, states):
            if isinstance(state, Exception):  # the request fails, the engine goes on
                events.append(EngineEvent("error", req.request_id, error=state))
                continue
            req.state = state
            with self._lock:
                self._running[req.request_id] = req
        return events

    def _pick_batch(self) -> list[_Request]:
        pipe = self.pipeline
        groups: dict[Any, list[_Request]] = {}
        for req in self._running.values():  # arrival order
            groups.setdefault(pipe.batch_key(req.state), []).append(req)
        key = min(groups, key=lambda k: (self._last_served.get(k, -1), groups[k][0].arrival))
        self._last_served[key] = self._step_no
        batch, tokens = [], 0
        for req in groups[key]:
            cost = req.state.step_tokens
            if batch and tokens + cost > self.config.max_batch_tokens:
                break
            batch.append(req)
            tokens += cost
        return batch

    def _denoise_one_batch(self) -> list[EngineEvent]:
        if not self._running:
            return []
        batch = self._pick_batch()
        states = [r.state for r in batch]
        pipe = self.pipeline
        try:
            with torch.no_grad():
                preds = pipe.denoise_step(states)
                pipe.scheduler_step(states, preds)
        except Exception as exc:
            return [self._fail(r, exc) for r in batch]
        self.stats.forwards += 1
        self.stats.batch_sizes.append(len(batch))
        events = [EngineEvent("step", r.request_id, r.state.step_index, r.state.num_steps) for r in batch]
        done = [r for r in batch if r.state.done]
        return events + (self._finish(done) if done else [])

    def _finish(self, done: list[_Request]) -> list[EngineEvent]:
        """Decode requests that finished in this step (together where the pipeline can)."""
        try:
            outputs = self.pipeline.decode_many([r.state for r in done])
        except Exception as exc:
            return [self._fail(r, exc) for r in done]
        events = []
        for req, output in zip(done, outputs):
            with self._lock:
                self._running.pop(req.request_id, None)
            req.state.release()
            req.state = None
            events.append(EngineEvent("finished", req.request_id, output=output))
        return events

    def _fail(self, req: _Request, exc: BaseException) -> EngineEvent:
        with self._lock:
            self._running.pop(req.request_id, None)
        if req.state is not None:
            req.state.release()
            req.state = None
        return EngineEvent("error", req.request_id, error=exc)

    def _run_one_whole(self) -> list[EngineEvent]:
        with self._lock:
            if not self._running:
                return []
            rid, req = next(iter(self._running.items()))
        events: list[EngineEvent] = []

        def progress(request_id: str, step: int, total: int) -> None:
            events.append(EngineEvent("step", request_id, step, total))

        try:
            output = self.pipeline.run_whole(req.params, rid, progress)
        except Exception as exc:
            return events + [self._fail(req, exc)]
        with self._lock:
            self._running.pop(rid, None)
        self.stats.forwards += 1
        self.stats.batch_sizes.append(1)
        return events + [EngineEvent("finished", rid, output=output)]
