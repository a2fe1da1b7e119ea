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

Failures stay with their request: when a shared call (the batched forward,
`prepare_many`, `decode_many`) raises, the requests in it are retried one by
one and only those that raise alone fail; a scheduler step runs per request.

Monolithic (generic) pipelines run one whole request per step; an abort stops
one at its next denoise step (the pipeline's step callback).
No vLLM here: this runs on a bare GPU box (ARCHITECTURE.md, principle 3).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .handover import check_stage_input
from .interface import DiffusionPipelineBase, StepwisePipeline
from .output import DiffusionOutput
from .params import ResolvedParams, SamplingParams
from .state import DiffusionState

logger = logging.getLogger(__name__)

#: the stage name a diffusion-only model's outputs report their dtype under (`DiffusionOutput.dtypes`)
DIFFUSION_STAGE = "diffusion"


class _AbortedMidRun(Exception):
    """Raised from a monolithic pipeline's step callback to stop an aborted request."""


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
    #: what the stage before this one handed over for the request (diffusion/handover.py)
    stage_input: Any = None
    state: DiffusionState | None = None


# Every forward of the engine (text encoders, denoiser, VAE) picks its SDPA kernel from this
# list, in this order, whatever else in the process changed torch's global switches.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


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
        self._dtype_name: str | None = None

    # ---- client side (thread-safe) ---------------------------------------------
    def add_request(self, request_id: str, params: SamplingParams | ResolvedParams,
                    stage_input: Any = None) -> ResolvedParams:
        """Queue a request. Parameters resolve here, so bad input fails now, to the caller.

        Args:
            request_id: unique among the engine's requests.
            params: the request's parameters (resolved here unless they are already).
            stage_input: what the stage before this one handed over for it (a multi-stage
                model's DiT stage: the pipeline's `stage_input_type`), else None.

        Raises:
            StageInputError: the stage input is missing, of another type or another request's.
        """
        check_stage_input(self.pipeline, request_id, stage_input)
        resolved = params if isinstance(params, ResolvedParams) else self.pipeline.resolve(params, self.stage_defaults)
        with self._lock:
            if request_id in self._waiting or request_id in self._running:
                raise ValueError(f"request id {request_id!r} is already in the engine")
            self._waiting[request_id] = _Request(request_id, resolved, next(self._arrivals), stage_input)
        return resolved

    def add_requests(
        self, requests: list[tuple[str, SamplingParams | ResolvedParams, Any]]
    ) -> list[ResolvedParams | Exception]:
        """Queue several requests at once, so that one step admits them together (one
        `prepare_many`, as `Omni.generate` of several prompts in one process does).

        Args:
            requests: (request id, params, stage input or None) per request, as for `add_request`.

        Returns:
            per request, its resolved parameters or the error that refused it alone.
        """
        out: list[ResolvedParams | Exception] = []
        for rid, params, stage_input in requests:
            try:
                check_stage_input(self.pipeline, rid, stage_input)
                out.append(params if isinstance(params, ResolvedParams)
                           else self.pipeline.resolve(params, self.stage_defaults))
            except Exception as exc:  # noqa: BLE001 -- that request's own error, returned to its caller
                out.append(exc)
        with self._lock:
            for i, ((rid, _, stage_input), resolved) in enumerate(zip(requests, out)):
                if isinstance(resolved, Exception):
                    continue
                if rid in self._waiting or rid in self._running:
                    out[i] = ValueError(f"request id {rid!r} is already in the engine")
                    continue
                self._waiting[rid] = _Request(rid, resolved, next(self._arrivals), stage_input)
        return out

    def close(self) -> None:
        """Release what the engine owns (a multi-rank engine stops its workers; see workers.py)."""

    def abort(self, request_id: str) -> None:
        """Stop a request at the end of the denoise step it is in; its memory is released there.

        Step-wise pipelines stop at the engine's next step boundary; monolithic ones
        (run as one unit) at the pipeline's next step callback.
        """
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def run_loop(
        self,
        stopping: Callable[[], bool],
        wake: threading.Event,
        fail: Callable[[Exception], list],
        deliver: Callable[[list, float], None],
    ) -> None:
        """The loop of the thread that drives this engine, until `stopping()`: step while requests
        are unfinished, else wait for `wake`; hand each step's events and its seconds to `deliver`.

        A step that raises is logged and `fail(exc)` gives the events to deliver instead (the
        caller aborts the requests it knows and reports the error to each).
        """
        while not stopping():
            if not self.has_unfinished():
                wake.wait()
                wake.clear()
                continue
            started = time.perf_counter()
            try:
                events = self.step()
            except Exception as exc:  # noqa: BLE001 -- handed to every request in the engine, logged
                logger.exception("diffusion engine step failed; failing the requests in it")
                events = fail(exc)
            deliver(events, time.perf_counter() - started)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- engine loop -----------------------------------------------------------
    @property
    def _group(self):
        return getattr(self.pipeline, "parallel", None)

    def step(self) -> list[EngineEvent]:
        # The attention kernels are pinned here rather than left to torch's process-wide flags:
        # importing vLLM's server switches cuDNN SDPA off for the whole process, which made a
        # served image differ from the offline one by a few levels (seen on an H200).
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            return self._step()

    def _step(self) -> list[EngineEvent]:
        dropped, admitted = self._take_plan()
        group = self._group
        if group is not None:  # multi-GPU: every rank applies rank 0's plan (parallel.py)
            group.broadcast_plan(
                ([r.request_id for r in dropped],
                 [(r.request_id, r.params, r.arrival, r.stage_input) for r in admitted])
            )
        return self._apply_plan(dropped, admitted)

    def follow(self) -> None:
        """Worker ranks: apply rank 0's plan each step until rank 0 sends the stop plan (None)."""
        group = self._group
        while (plan := group.broadcast_plan(None)) is not None:
            dropped_ids, admitted = plan
            with self._lock:
                dropped = [self._running.pop(r) for r in dropped_ids if r in self._running]
            with sdpa_kernel(SDPA_BACKENDS, set_priority=True):  # the same kernels as rank 0
                self._apply_plan(dropped, [_Request(*entry) for entry in admitted])

    def stop_followers(self) -> None:
        """Rank 0: release the worker ranks from `follow()`."""
        if self._group is not None:
            self._group.broadcast_plan(None)

    def _apply_plan(self, dropped: list[_Request], admitted: list[_Request]) -> list[EngineEvent]:
        events = self._release_aborted(dropped)
        events += self._admit(admitted)
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

    def _take_plan(self) -> tuple[list[_Request], list[_Request]]:
        """This step's aborted requests (at this step boundary) and the waiting requests it admits."""
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            dropped = [self._waiting.pop(r, None) or self._running.pop(r, None) for r in aborts]
            room = self.config.max_running - len(self._running)
            admitted = [self._waiting.popitem(last=False)[1] for _ in range(min(room, len(self._waiting)))]
        return [r for r in dropped if r is not None], admitted

    def _release_aborted(self, dropped: list[_Request]) -> list[EngineEvent]:
        events = []
        for req in dropped:
            if req.state is not None:
                req.state.release()
                req.state = None
            events.append(EngineEvent("aborted", req.request_id))
        return events

    def _admit(self, admitted: list[_Request]) -> list[EngineEvent]:
        """Move admitted requests to running; all admitted in one step are prepared in one call."""
        if not admitted:
            return []
        if isinstance(self.pipeline, StepwisePipeline):
            states = self._prepare(admitted)
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

    def _prepare(self, admitted: list[_Request]) -> list[DiffusionState | Exception]:
        """`prepare_many` for the admitted requests; if its shared work raises, each is prepared alone."""
        params, ids = [r.params for r in admitted], [r.request_id for r in admitted]
        try:
            if self.pipeline.stage_input_type is None:
                return self.pipeline.prepare_many(params, ids)
            return self.pipeline.prepare_many(params, ids, [r.stage_input for r in admitted])
        except Exception as exc:  # noqa: BLE001 -- handed to the request(s) it belongs to
            if len(admitted) == 1:
                return [exc]
            return [state for req in admitted for state in self._prepare([req])]

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
        pipe = self.pipeline
        try:
            with torch.no_grad():
                preds = pipe.denoise_step([r.state for r in batch])
        except Exception as exc:  # noqa: BLE001 -- handed to the request(s) it belongs to
            if len(batch) == 1:
                return [self._fail(batch[0], exc)]
            # A shared forward raised: run each request alone, so only the one(s)
            # that raise on their own fail and the others take their step.
            return self._denoise_one_by_one(batch)
        self.stats.forwards += 1
        self.stats.batch_sizes.append(len(batch))
        return self._advance(list(zip(batch, preds)))

    def _denoise_one_by_one(self, batch: list[_Request]) -> list[EngineEvent]:
        events, stepped = [], []
        for req in batch:
            try:
                with torch.no_grad():
                    stepped.append((req, self.pipeline.denoise_step([req.state])[0]))
            except Exception as exc:  # noqa: BLE001 -- this request's own error
                events.append(self._fail(req, exc))
            else:
                self.stats.forwards += 1
                self.stats.batch_sizes.append(1)
        return events + self._advance(stepped)

    def _advance(self, stepped: list[tuple[_Request, torch.Tensor]]) -> list[EngineEvent]:
        """Scheduler step per request (a failure fails that request only), progress events, decodes."""
        events, done = [], []
        for req, pred in stepped:
            try:
                self.pipeline.scheduler_step([req.state], [pred])
            except Exception as exc:  # noqa: BLE001 -- this request's own error
                events.append(self._fail(req, exc))
                continue
            events.append(EngineEvent("step", req.request_id, req.state.step_index, req.state.num_steps))
            if req.state.done:
                done.append(req)
        return events + (self._finish(done) if done else [])

    def _finish(self, done: list[_Request]) -> list[EngineEvent]:
        """Decode requests that finished in this step (together where the pipeline can; alone if that raises)."""
        group = self._group
        started = time.perf_counter()
        try:
            if group is not None and not group.is_driver:  # only rank 0 decodes and answers
                outputs = [None] * len(done)
            else:
                outputs = self.pipeline.decode_many([r.state for r in done])
        except Exception as exc:  # noqa: BLE001 -- handed to the request(s) it belongs to
            if len(done) == 1:
                return [self._fail(done[0], exc)]
            return [event for req in done for event in self._finish([req])]
        decode_seconds = time.perf_counter() - started  # outputs are host images: the GPU work is done
        events = []
        for req, output in zip(done, outputs):
            if output is not None:  # (None on worker ranks)
                output.timings["decode"] = decode_seconds
                self._stamp(output)
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
            # A whole-request run has no step boundary of the engine's: an abort is
            # checked after every denoise step here, and ends the run by unwinding it.
            with self._lock:
                if request_id in self._aborts:
                    self._aborts.discard(request_id)
                    raise _AbortedMidRun(request_id)
            events.append(EngineEvent("step", request_id, step, total))

        try:
            output = self.pipeline.run_whole(req.params, rid, progress)
        except _AbortedMidRun:
            with self._lock:
                self._running.pop(rid, None)
            return events + [EngineEvent("aborted", rid)]
        except Exception as exc:  # noqa: BLE001 -- one request's failure is its own error event; the others go on
            return events + [self._fail(req, exc)]
        with self._lock:
            self._running.pop(rid, None)
        self.stats.forwards += 1
        self.stats.batch_sizes.append(1)
        return events + [EngineEvent("finished", rid, output=self._stamp(output))]

    def _stamp(self, output: DiffusionOutput) -> DiffusionOutput:
        """Record on an output the dtype it was made in (a multi-stage orchestrator adds its stages')."""
        if self._dtype_name is None:
            self._dtype_name = self.pipeline.dtype_name
        output.dtypes.setdefault(DIFFUSION_STAGE, self._dtype_name)
        return output
