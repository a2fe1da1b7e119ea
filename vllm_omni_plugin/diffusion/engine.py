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

Partial images (`params.partial_images` = k > 0, families that declare
`Capabilities.partial_images`): after the steps `partial_steps(N, k)` names, the
engine takes the pipeline's `x0_estimate` of the request (one element-wise op
on its latents, before the scheduler step) and hands that snapshot to ONE
partial-decode thread, which runs `decode_partial` (the family's VAE) while the
step loop goes on with the next forward. A later `step()` collects finished
decodes as "partial" events (never waiting for one that is still running), so
the denoising of the other requests in the batch never waits for a partial
decode. A request whose last step comes before its partial decodes are done
keeps its "finished" event until they are, so its partial events always come
first; the loop then only blocks on them when nothing else is running. An
abort drops its pending partial decodes.
No vLLM here: this runs on a bare GPU box (ARCHITECTURE.md, principle 3).
"""

from __future__ import annotations

import concurrent.futures
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
from .lora import LoraError, LoraNotFound, LoraPolicy
from .output import DiffusionOutput
from .params import ResolvedParams, SamplingParams, partial_steps
from .state import DiffusionState

logger = logging.getLogger("vllm.omni_plugin.diffusion")

#: the stage name a diffusion-only model's outputs report their dtype under (`DiffusionOutput.dtypes`)
DIFFUSION_STAGE = "diffusion"


class _AbortedMidRun(Exception):
    """Raised from a monolithic pipeline's step callback to stop an aborted request."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 65536
    max_running: int = 64
    #: per-request LoRA adapters (diffusion/lora.py): the operator's policy; None: LoRA off
    lora: LoraPolicy | None = None
    #: (name, path) adapters loaded at start (their paths count as allowed)
    loras: tuple[tuple[str, str], ...] = ()


@dataclass
class EngineEvent:
    """kind: "step" (progress), "partial" (a partial image: `index`, `output.images` one per
    row, `step` the step it was taken after), "finished" (output set), "aborted", "error"
    (error set)."""

    kind: str
    request_id: str
    step: int = 0
    total: int = 0
    output: DiffusionOutput | None = None
    error: BaseException | None = None
    index: int = 0


@dataclass
class _PendingPartial:
    index: int
    step: int
    total: int
    future: concurrent.futures.Future


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
        # partial images: request id -> its decodes in flight (in index order); finished
        # events held until those are out; the one decode thread (made on first use)
        self._partials: dict[str, list[_PendingPartial]] = {}
        self._held: OrderedDict[str, EngineEvent] = OrderedDict()
        self._partial_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._partial_stream: Any = None  # CUDA: the decode thread's stream
        self._dtype_name: str | None = None  # the DiT weights' dtype, read once (`_stamp`)

        if self.config.lora is not None:
            loras = pipeline.enable_lora(self.config.lora)
            for name, path in self.config.loras:
                loras.register(name, path, operator=True)

    # ---- LoRA adapters (thread-safe; the engine-core RPC and Omni call these) -------------------
    def load_lora(self, name: str, path: str, operator: bool = False) -> dict[str, Any]:
        """Check, read and register an adapter (LoraError naming the rule it breaks); `operator`:
        the path is the operator's own (start-up flags, offline `Omni.load_lora`), allowed as such."""
        if self.pipeline.loras is None:
            raise LoraError("LoRA adapters are off for this model (start it with --omni-lora-dirs or --omni-lora)",
                            "lora_path")
        adapter = self.pipeline.loras.register(name, path, operator=operator)
        return {"name": name, "path": adapter.path, "rank": adapter.rank, "modules": len(adapter.modules)}

    def unload_lora(self, name: str) -> None:
        """Forget an adapter; refused (LoraBusy) while a queued or running request uses it."""
        if self.pipeline.loras is None:
            raise LoraNotFound(f"LoRA adapter {name!r} is not loaded", "lora_name")
        self.pipeline.loras.unregister(name)

    def list_loras(self) -> list[dict[str, Any]]:
        return [] if self.pipeline.loras is None else self.pipeline.loras.describe()

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
        self._pin(resolved)
        with self._lock:
            if request_id in self._waiting or request_id in self._running:
                self._unpin(resolved)
                raise ValueError(f"request id {request_id!r} is already in the engine")
            self._waiting[request_id] = _Request(request_id, resolved, next(self._arrivals), stage_input)
        return resolved

    def _pin(self, params: ResolvedParams) -> None:
        """Hold the request's LoRA adapters resident (an evicted one reloads) until it ends."""
        if params.lora:
            loras = self.pipeline.loras
            if loras is None:
                raise LoraError("this model serves no LoRA adapters", "lora")
            loras.acquire(params.lora)

    def _unpin(self, params: ResolvedParams) -> None:
        if params.lora and self.pipeline.loras is not None:
            self.pipeline.loras.release(params.lora)

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
                resolved = (params if isinstance(params, ResolvedParams)
                            else self.pipeline.resolve(params, self.stage_defaults))
                self._pin(resolved)
                out.append(resolved)
            except Exception as exc:  # noqa: BLE001 -- that request's own error, returned to its caller
                out.append(exc)
        with self._lock:
            for i, ((rid, _, stage_input), resolved) in enumerate(zip(requests, out)):
                if isinstance(resolved, Exception):
                    continue
                if rid in self._waiting or rid in self._running:
                    self._unpin(resolved)
                    out[i] = ValueError(f"request id {rid!r} is already in the engine")
                    continue
                self._waiting[rid] = _Request(rid, resolved, next(self._arrivals), stage_input)
        return out

    def close(self) -> None:
        """Release what the engine owns (a multi-rank engine stops its workers; see workers.py)."""
        if self._partial_pool is not None:
            self._partial_pool.shutdown(wait=True, cancel_futures=True)

    def abort(self, request_id: str) -> None:
        """Stop a request at the end of the denoise step it is in; its memory is released there.

        Step-wise pipelines stop at the engine's next step boundary; monolithic ones
        (run as one unit) at the pipeline's next step callback.
        """
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._held)

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
            # Stage inputs do not ride the broadcast: each rank is sent the shard of each one it
            # needs (StepwisePipeline.stage_input_shard: BAGEL's context KV of its own CFG branches).
            sharded = any(r.stage_input is not None for r in admitted)
            group.broadcast_plan(
                ([r.request_id for r in dropped],
                 [(r.request_id, r.params, r.arrival, None) for r in admitted], sharded)
            )
            if sharded:
                self._send_stage_inputs(group, admitted)
        return self._apply_plan(dropped, admitted)

    def _send_stage_inputs(self, group: Any, admitted: list[_Request]) -> None:
        """Rank 0: each worker rank gets its shards of the admitted requests' stage inputs; rank 0 keeps its own."""
        shard = self.pipeline.stage_input_shard
        degree = group.config.cfg_degree
        for rank in range(1, group.config.world_size):
            cfg_rank = group.cfg_rank_of(rank)
            group.send_object([None if r.stage_input is None else shard(r.stage_input, r.params, cfg_rank, degree)
                               for r in admitted], rank)
        for r in admitted:
            if r.stage_input is not None:
                r.stage_input = shard(r.stage_input, r.params, group.cfg_rank, degree)

    def follow(self) -> None:
        """Worker ranks: apply rank 0's plan each step until rank 0 sends the stop plan (None)."""
        group = self._group
        while (plan := group.broadcast_plan(None)) is not None:
            dropped_ids, admitted, sharded = plan
            requests = [_Request(*entry) for entry in admitted]
            if sharded:  # this rank's shards of the stage inputs (_send_stage_inputs)
                for req, stage_input in zip(requests, group.recv_object(0)):
                    req.stage_input = stage_input
            with self._lock:
                dropped = [self._running.pop(r) for r in dropped_ids if r in self._running]
            with sdpa_kernel(SDPA_BACKENDS, set_priority=True):  # the same kernels as rank 0
                self._apply_plan(dropped, requests)

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
        if self._partials or self._held:
            # Nothing else to run: waiting for a partial decode delays nobody.
            events += self._collect_partials(block=not self._running and not self._waiting)
        self._step_no += 1
        return events

    # ---- partial images --------------------------------------------------------
    def _take_partial(self, req: _Request, pred: torch.Tensor) -> None:
        """Before the scheduler step: snapshot the x0 estimate if this step is one of the
        request's partial steps, and queue its decode on the partial-decode thread."""
        state, params = req.state, req.params
        if not params.partial_images:
            return
        group = self._group
        if group is not None and not group.is_driver:  # only rank 0 answers
            return
        steps = partial_steps(state.num_steps, params.partial_images)
        done_after = state.step_index + 1
        if done_after not in steps:
            return
        with torch.no_grad():
            x0 = self.pipeline.x0_estimate(state, pred)
        if self._partial_pool is None:
            self._partial_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="omni-partial-decode")
            if x0.is_cuda:  # the decode thread's own stream: its kernels do not queue behind (or ahead of) the loop's
                self._partial_stream = torch.cuda.Stream(x0.device)
        ready = None
        if x0.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # x0 is computed on the loop's stream; the decode stream waits for it
            x0.record_stream(self._partial_stream)  # (the allocator must not hand its memory back early)
        future = self._partial_pool.submit(self._decode_partial, x0, params, ready)
        self._partials.setdefault(req.request_id, []).append(
            _PendingPartial(steps.index(done_after), done_after, state.num_steps, future))

    def _decode_partial(self, x0: torch.Tensor, params: ResolvedParams, ready: Any = None) -> list[Any]:
        """(the partial-decode thread; grad mode is per thread). On CUDA it runs on its own stream
        after `ready` (x0 computed). The SDPA kernel choice is not pinned here: it is process-wide,
        and the step loop pins it around every step."""
        if ready is None:
            with torch.no_grad():
                return self.pipeline.decode_partial(x0, params)
        with torch.no_grad(), torch.cuda.stream(self._partial_stream):
            self._partial_stream.wait_event(ready)
            return self.pipeline.decode_partial(x0, params)  # (PIL images: synchronized with its stream)

    def _collect_partials(self, block: bool = False) -> list[EngineEvent]:
        """Partial events of the decodes that are done (in index order per request), then the
        held finished events whose partials are all out. `block`: wait for at least one."""
        if block:
            pending = [p.future for ps in self._partials.values() for p in ps[:1]]
            if pending:
                concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        events: list[EngineEvent] = []
        for rid in list(self._partials):
            queue = self._partials[rid]
            while queue and queue[0].future.done():
                p = queue.pop(0)
                exc = p.future.exception()
                if exc is not None:  # the request fails with its decoder's error
                    logger.error("partial image %d of request %s failed: %s", p.index, rid, exc)
                    self._drop_partials(rid)
                    held = self._held.pop(rid, None)
                    if held is None:
                        self.abort(rid)  # (its "aborted" event then finds no caller waiting)
                    events.append(EngineEvent("error", rid, error=exc))
                    break
                events.append(EngineEvent("partial", rid, p.step, p.total, index=p.index,
                                          output=DiffusionOutput(rid, "image", None, images=list(p.future.result()))))
            if not self._partials.get(rid):
                self._partials.pop(rid, None)
        for rid in [r for r in self._held if r not in self._partials]:
            events.append(self._held.pop(rid))
        return events

    def _drop_partials(self, request_id: str) -> None:
        for p in self._partials.pop(request_id, ()):
            p.future.cancel()

    def run(self, on_event: Callable[[EngineEvent], None] | None = None) -> dict[str, EngineEvent]:
        """Step until the queue is empty; returns each request's final event."""
        final: dict[str, EngineEvent] = {}
        while self.has_unfinished():
            for event in self.step():
                if on_event is not None:
                    on_event(event)
                if event.kind not in ("step", "partial"):
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
            self._drop_partials(req.request_id)
            self._unpin(req.params)
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
                self._unpin(req.params)
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
                self._take_partial(req, pred)
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
            self._unpin(req.params)
            req.state.release()
            req.state = None
            event = EngineEvent("finished", req.request_id, output=output)
            if req.request_id in self._partials:  # after its partial images (see _collect_partials)
                self._held[req.request_id] = event
            else:
                events.append(event)
        return events

    def _fail(self, req: _Request, exc: BaseException) -> EngineEvent:
        self._drop_partials(req.request_id)
        with self._lock:
            self._running.pop(req.request_id, None)
        self._unpin(req.params)
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
