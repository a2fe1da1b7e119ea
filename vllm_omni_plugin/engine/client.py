"""`EngineCoreClient`: the diffusion engine in its own process, behind one client.

    client = EngineCoreClient(EngineSpec(PipelineBuilder(path, dtype)), max_queue=64)
    client.start()                                   # spawns the process, waits until it has loaded
    params = client.resolve(SamplingParams(...))     # validated by the loaded pipeline (a round trip)
    handle = client.submit(params, on_progress)      # any thread; never blocks on the engine
    output = await client.result(handle)             # asyncio (the server) ...
    output = client.wait(handle)                     # ... or blocking (offline Omni)
    client.abort(handle.request_id)                  # stops it at the engine's next step
    client.stop()

The process is `python -m vllm_omni_plugin.engine.core` (core.py), connected
over three ZMQ IPC sockets made for each incarnation of it: input (requests,
aborts), output (events of every step), RPC (resolve). Tensors and images cross
as raw frames (codec.py).

What a caller can count on:

* every submitted request ends exactly once -- output, `GenerationFailed` (the
  engine's error as `__cause__`), `RequestAborted`, `StageUnavailable` or
  `EngineStopped`. The reader thread watches the process; if it dies, every
  request in it fails with `StageUnavailable` naming the stage and the process
  (a 503 on the server) and the process is started again from the same spec;
  meanwhile `submit` and `resolve` raise `StageUnavailable`. A start that fails
  (the checkpoint does not load) is not retried: the client is then "failed".
* replies that can be lost have a deadline: `resolve` gives up after
  `rpc_timeout` seconds (StageUnavailable); events cannot be lost while the
  process lives (ZMQ IPC delivers in order), and its death settles them.
* at most `max_queue` requests at once; one more is refused with `QueueFull`.
* `submit_many` hands requests over in one message, so one engine step
  admits them together (one batched text encoding, as in one process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import zmq

from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from . import codec
from .errors import EngineStopped, GenerationFailed, QueueFull, RequestAborted, StageUnavailable
from .handles import ClientBase, ClientStats, PartialFn, ProgressFn, RequestHandle
from .messages import Abort, AddRequest, AddRequests, Call, Events, Ready, Shutdown, StartFailed, frames_of, parse
from .spec import EngineSpec, PipelineInfo

logger = logging.getLogger("vllm.omni_plugin.engine")

#: how often the reader thread checks that the process lives while no event comes (seconds)
LIVENESS_POLL_S = 0.2


class EngineStartError(RuntimeError):
    """The engine-core process could not build its engine; `__cause__` is its error."""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Incarnation:
    """One engine-core process and the sockets the client talks to it over."""

    def __init__(self, ctx: zmq.Context, spec: EngineSpec, generation: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="omni-engine-")
        addr = {name: f"ipc://{self.dir}/{name}" for name in ("input", "output", "rpc")}
        self.input = ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.bind(addr["input"])
        self.output = ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.bind(addr["output"])
        self.rpc = ctx.socket(zmq.DEALER)
        self.rpc.setsockopt(zmq.LINGER, 0)
        self.rpc.bind(addr["rpc"])
        cmd = [sys.executable, "-m", "vllm_omni_plugin.engine.core", "--input", addr["input"],
               "--output", addr["output"], "--rpc", addr["rpc"], "--parent", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        (spec_bytes,) = codec.encode(spec)  # a spec is small: one frame, no raw buffers
        self.proc.stdin.write(spec_bytes)
        self.proc.stdin.close()
        self.generation = generation
        self.pid = self.proc.pid

    def close(self) -> None:
        for sock in (self.input, self.output, self.rpc):
            sock.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


class EngineCoreClient(ClientBase):
    """The client of one diffusion engine-core process (see the module docstring).

    Args:
        spec: what the process builds (checkpoint, device, multi-GPU layout, batch limits).
        max_queue: requests in the engine at once (--omni-max-queue); None: no bound (offline).
        rpc_timeout: seconds a `resolve` waits for its reply.
        stop_timeout: seconds `stop` waits for the process to exit before killing it.
    """

    def __init__(self, spec: EngineSpec, max_queue: int | None = 64, *, rpc_timeout: float = 60.0,
                 stop_timeout: float = 30.0) -> None:
        if spec.torch_threads is None:  # the engine computes with this process's thread count
            import torch

            spec = dataclasses.replace(spec, torch_threads=torch.get_num_threads())
        self.spec = spec
        self.max_queue = max_queue
        self.rpc_timeout = rpc_timeout
        self.stop_timeout = stop_timeout
        self.stats = ClientStats()
        #: "starting" | "running" | "restarting" | "failed" | "stopped"
        self.status = "starting"
        self.info: PipelineInfo | None = None
        #: whether the engine process had imported vLLM when it was ready (it must not)
        self.vllm_imported: bool | None = None
        #: called with (step seconds, requests advanced) after every engine step
        self.step_observer: Callable[[float, int], None] | None = None
        self.running = 0
        self._ctx = zmq.Context()
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()  # handles, the input socket
        self._rpc_lock = threading.Lock()
        self._ids = itertools.count()
        self._calls = itertools.count()
        self._core: _Incarnation | None = None
        self._generations = itertools.count()
        self._reader: threading.Thread | None = None
        self._down_reason = ""

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until it has loaded the model (blocking).

        Raises:
            EngineStartError: the process could not build its engine (its error as `__cause__`).
        """
        self._core = self._launch()
        self.status = "running"
        self._reader = threading.Thread(target=self._read, name="omni-engine-client", daemon=True)
        self._reader.start()

    def _launch(self) -> _Incarnation:
        core = _Incarnation(self._ctx, self.spec, next(self._generations))
        try:
            while not core.output.poll(int(LIVENESS_POLL_S * 1000)):
                if core.proc.poll() is not None:
                    raise EngineStartError(f"the {self.spec.stage} stage's engine process (pid {core.pid}) exited "
                                           f"while loading ({_exit_text(core.proc.returncode)}); see its log above")
            message, buffers = parse("from_core", core.output.recv_multipart(copy=False))
            if isinstance(message, StartFailed):
                cause = codec.unpack(message.error, buffers)
                logger.error("omni: the %s stage's engine process failed to start:\n%s", self.spec.stage,
                             message.traceback)
                raise EngineStartError(f"the {self.spec.stage} stage's engine could not start: "
                                       f"{type(cause).__name__}: {cause}") from cause
            if not isinstance(message, Ready):
                raise EngineStartError(f"the engine process sent {type(message).__name__} before Ready")
        except BaseException:
            self._reap(core)
            raise
        self.info = codec.unpack(message.info, buffers)
        self.vllm_imported = message.vllm_imported
        if message.vllm_imported:
            logger.warning("omni: the diffusion engine process imported vLLM; it should not need it (principle 3)")
        logger.info("omni: %s stage engine process pid %d is ready", self.spec.stage, core.pid)
        return core

    def _reap(self, core: _Incarnation, timeout: float = 0.0) -> None:
        if timeout:
            try:
                core.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if core.proc.poll() is None:
            core.proc.kill()
            core.proc.wait(10)
        core.close()

    def stop(self) -> None:
        """Stop the engine process; requests still in it end with EngineStopped (idempotent)."""
        if self.status == "stopped":
            return
        self.status = "stopped"
        core = self._core
        if core is not None:
            with self._lock:
                try:
                    core.input.send_multipart(frames_of(Shutdown(), []))
                except zmq.ZMQError:
                    pass
        if self._reader is not None:
            self._reader.join(self.stop_timeout)
        if core is not None:
            self._reap(core, self.stop_timeout)
        self._fail_all(lambda rid: EngineStopped("the server shut down before this request finished"))
        if self._reader is None or not self._reader.is_alive():  # (a restart still loading keeps its sockets)
            self._ctx.term()

    @property
    def pid(self) -> int | None:
        """The engine process's pid (None while none runs)."""
        core = self._core
        return core.pid if core is not None and self.status == "running" else None

    @property
    def alive(self) -> bool:
        return self.status == "running"

    def health(self) -> str | None:
        """None while serving; otherwise what is down (the /health answer)."""
        stage = self.spec.stage
        if self.status == "running":
            return None
        if self.status == "restarting":
            return f"the {stage} stage's engine process died ({self._down_reason}); the server is restarting it"
        if self.status == "failed":
            return f"the {stage} stage's engine process died and could not be restarted ({self._down_reason})"
        return f"the {stage} stage's engine is not running ({self.status})"

    def _check_up(self) -> None:
        if self.status != "running":
            raise StageUnavailable(self.health() or "the diffusion engine is not running")

    # ---- requests (any thread) ---------------------------------------------------------
    def resolve(self, request: SamplingParams, stage_defaults: Any = None) -> ResolvedParams:
        """Resolve `request` with the engine's pipeline and stage defaults (blocking round trip).

        Args:
            request: what the caller asks for.
            stage_defaults: must be None or the engine's own (they are applied in the engine).

        Raises:
            whatever the pipeline's `resolve` raises (UnsupportedField, ValueError ...), rebuilt here;
            StageUnavailable: the engine is down, or no reply came within `rpc_timeout`.
        """
        if stage_defaults is not None and stage_defaults != self.info.stage_defaults:
            raise ValueError("the engine process resolves with its own stage defaults; pass None")
        return self.call("resolve", request)

    def call(self, method: str, arg: Any = None) -> Any:
        """One RPC to the engine process (resolve, ping); see `resolve` for what it raises."""
        self._check_up()
        call_id = next(self._calls)
        buffers: list[Any] = []
        frames = frames_of(Call(call_id, method, codec.pack(arg, buffers)), buffers)
        deadline = time.monotonic() + self.rpc_timeout
        with self._rpc_lock:
            core = self._core
            core.rpc.send_multipart(frames, copy=False)
            while True:
                if not core.rpc.poll(int(LIVENESS_POLL_S * 1000)):
                    if core.generation != getattr(self._core, "generation", None) or self.status != "running":
                        raise StageUnavailable(f"the {self.spec.stage} stage's engine process died during {method}")
                    if time.monotonic() > deadline:
                        raise StageUnavailable(f"the {self.spec.stage} stage's engine did not answer {method} "
                                               f"within {self.rpc_timeout:.0f} s")
                    continue
                reply, buffers = parse("reply", core.rpc.recv_multipart(copy=False))
                if reply.call_id == call_id:  # (an earlier call's late reply is dropped)
                    break
        if reply.error is not None:
            raise codec.unpack(reply.error, buffers)
        return codec.unpack(reply.value, buffers)

    def submit_many(self, requests: Sequence[tuple[ResolvedParams, Any]],
                    on_progress: ProgressFn | Sequence[ProgressFn | None] | None = None,
                    prefix: str = "omni", request_ids: Sequence[str | None] | None = None,
                    on_partial: PartialFn | Sequence[PartialFn | None] | None = None) -> list[RequestHandle]:
        """Queue requests that one engine step admits together.

        Args:
            requests: (resolved params, typed stage input or None) per request.
            on_progress: called with (step, total) after every denoise step of each request
                (or one per request), on the caller's event loop when called from one, else on
                the client's thread.
            prefix: request id prefix ("images", "video" ...).
            request_ids: ids chosen by the caller (None: made here).
            on_partial: called with (index, images) for each partial image of a request that
                asks for them (`params.partial_images`), where `on_progress` is called; the
                images cross from the engine process as raw frames.

        Returns:
            one handle per request, in order.

        Raises:
            StageUnavailable: the engine process is down (restarting or failed).
            QueueFull: the requests would exceed `max_queue`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        ids = list(request_ids or [None] * len(requests))
        buffers: list[Any] = []
        progress = list(on_progress) if isinstance(on_progress, (list, tuple)) else [on_progress] * len(requests)
        partials = list(on_partial) if isinstance(on_partial, (list, tuple)) else [on_partial] * len(requests)
        with self._lock:  # (the status is checked under the lock the reader flips it under: see _engine_died)
            self._check_up()
            if self.max_queue is not None and len(self._handles) + len(requests) > self.max_queue:
                self.stats.rejected += len(requests)
                raise QueueFull(
                    f"the server is at capacity ({len(self._handles)} requests in the diffusion engine, "
                    f"--omni-max-queue {self.max_queue}); retry later"
                )
            handles, adds = [], []
            for (params, stage_input), rid, on_progress, partial in zip(requests, ids, progress, partials):
                rid = rid or f"{prefix}-{next(self._ids)}-{int(time.time() * 1000)}"
                if rid in self._handles or any(h.request_id == rid for h in handles):
                    raise ValueError(f"request id {rid!r} is already in the engine")
                handles.append(RequestHandle(rid, params, concurrent.futures.Future(), on_progress, loop,
                                             on_partial=partial))
                adds.append(AddRequest(rid, codec.pack(params, buffers), codec.pack(stage_input, buffers),
                                       wants_steps=on_progress is not None))
            # Registered before the send: the reader may see their events before this call returns.
            for h in handles:
                self._handles[h.request_id] = h
            try:
                self._core.input.send_multipart(frames_of(AddRequests(adds), buffers), copy=False)
            except BaseException:
                for h in handles:
                    del self._handles[h.request_id]
                raise
            self.stats.submitted += len(handles)
        return handles

    def abort(self, request_id: str) -> None:
        """Stop a request at the engine's next step (monolithic pipelines: at their next denoise step)."""
        with self._lock:
            if request_id in self._handles and self.status == "running":
                self._core.input.send_multipart(frames_of(Abort([request_id]), []))

    async def result(self, handle: RequestHandle) -> DiffusionOutput:
        """Await the request's output (raises as described in the module docstring)."""
        waiter = asyncio.wrap_future(handle.future)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may await an aborted one
        return await asyncio.shield(waiter)  # a cancelled awaiter must not cancel the shared future

    def wait(self, handle: RequestHandle, timeout: float | None = None) -> DiffusionOutput:
        """Block until the request's output (raises as `result`)."""
        return handle.future.result(timeout)

    # ---- the reader thread -------------------------------------------------------------
    def _read(self) -> None:
        while self.status in ("running", "restarting"):
            core = self._core
            try:
                ready = core.output.poll(int(LIVENESS_POLL_S * 1000))
            except zmq.ZMQError:
                return  # closed by stop()
            if ready:
                message, buffers = parse("from_core", core.output.recv_multipart(copy=False))
                if isinstance(message, Events):
                    self._dispatch(message, buffers)
                continue
            if core.proc.poll() is None or self.status == "stopped":
                continue
            self._engine_died(core)

    def _engine_died(self, core: _Incarnation) -> None:
        stage = self.spec.stage
        self._down_reason = f"pid {core.pid}, {_exit_text(core.proc.returncode)}"
        logger.error("omni: the %s stage's engine process died (%s); failing its requests and restarting it",
                     stage, self._down_reason)
        with self._lock:
            self.status = "restarting"
        self._fail_all(lambda rid: StageUnavailable(
            f"the {stage} stage's engine process died ({self._down_reason}) while request {rid} was in it; "
            "the server is restarting it, retry shortly"))
        self.running = 0
        self._reap(core)
        try:
            fresh = self._launch()
        except (EngineStartError, OSError) as e:
            logger.error("omni: restarting the %s stage's engine failed: %s", stage, e)
            with self._lock:
                self.status = "failed"
            return
        with self._lock, self._rpc_lock:
            if self.status != "restarting":  # stopped meanwhile
                self._reap(fresh)
                return
            self._core = fresh
            self.stats.restarts += 1
            self.status = "running"
        logger.info("omni: the %s stage's engine is running again (pid %d)", stage, fresh.pid)

    def _dispatch(self, message: Events, buffers: list[Any]) -> None:
        self.running = message.running
        if self.step_observer is not None:  # first: the steps are counted before a request they finish settles
            for seconds, stepped in message.steps:
                self.step_observer(seconds, stepped)
        for event in message.events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue  # already settled (failed by a step error, then aborted)
            if event.kind == "step":
                handle.step, handle.total = event.step, event.total
                if handle.on_progress is not None:
                    self._progress(handle, event.step, event.total)
            elif event.kind == "partial":
                if handle.on_partial is not None:
                    images = codec.unpack(event.output, buffers).images
                    self._call(handle, handle.on_partial, event.index, images)
            elif event.kind == "finished":
                output = codec.unpack(event.output, buffers)
                output.params = handle.params  # (the core leaves out what the client sent)
                self._settle(handle, output=output)
            elif event.kind == "aborted":
                self._settle(handle, error=RequestAborted(f"request {event.request_id} was aborted"))
            else:
                cause = codec.unpack(event.error, buffers)
                error = GenerationFailed(f"generation failed: {type(cause).__name__}: {cause}")
                error.__cause__ = cause
                self._settle(handle, error=error)

    @staticmethod
    def _progress(handle: RequestHandle, step: int, total: int) -> None:
        EngineCoreClient._call(handle, handle.on_progress, step, total)

    @staticmethod
    def _call(handle: RequestHandle, fn: Callable, *args: Any) -> None:
        """A request's callback: on the caller's event loop when it submitted from one, else here."""
        loop = handle.loop
        if loop is None:
            fn(*args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _settle(self, handle: RequestHandle, output: DiffusionOutput | None = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            if self._handles.pop(handle.request_id, None) is None:
                return
            if error is None:
                self.stats.finished += 1
            elif isinstance(error, RequestAborted):
                self.stats.aborted += 1
            else:
                self.stats.failed += 1
        if error is None:
            handle.future.set_result(output)
        else:
            handle.future.set_exception(error)

    def _fail_all(self, make_error: Callable[[str], BaseException]) -> None:
        for handle in list(self._handles.values()):
            self._settle(handle, error=make_error(handle.request_id))
