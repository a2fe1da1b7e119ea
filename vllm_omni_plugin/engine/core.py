"""The diffusion engine core process: `python -m vllm_omni_plugin.engine.core`.

Started by `EngineCoreClient` (client.py) as a fresh interpreter -- never a
fork of a process whose torch threads exist, and without re-importing the
caller's `__main__` (so scripts and notebooks need no `__main__` guard). It
reads its `EngineSpec` from stdin, builds the engine (the multi-GPU ranks are
spawned under this process by diffusion/workers.py, as in one process), and
then:

* the main thread pulls requests and aborts from the input socket, runs
  `DiffusionEngine.step()` while any request is unfinished (blocking on the
  socket when idle) and pushes each step's events -- progress (step i/N),
  outputs, aborts, errors -- to the output socket;
* an RPC thread answers `resolve` calls (parameter resolution needs the loaded
  pipeline's config; it runs while the main thread steps, so a request is
  validated without waiting for a step to end);
* a watchdog thread exits the process when its parent is gone, so no engine
  outlives the server that started it.

Nothing here imports vLLM (ARCHITECTURE.md, principle 3); `Ready` reports
whether anything did, and a test checks it.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from . import codec
from .messages import (Abort, AddRequests, Event, Events, Ready, Reply, Shutdown, StartFailed, frames_of,
                       parse)
from .spec import EngineSpec, PipelineInfo

logger = logging.getLogger("vllm.omni_plugin.engine")

#: how often the watchdog looks for its parent (seconds)
PARENT_POLL_S = 1.0


def _event_message(event: Any, buffers: list[Any]) -> Event:
    # The output's params are the ones the client sent (it puts them back): not shipped again,
    # with the input images they hold.
    output = codec.pack(dataclasses.replace(event.output, params=None), buffers) if event.output is not None else None
    error = codec.pack(event.error, buffers) if event.error is not None else None
    return Event(event.kind, event.request_id, event.step, event.total, output, error, getattr(event, "index", 0))


class EngineCore:
    """The engine-core loop over one DiffusionEngine (see the module docstring).

    Requests and aborts are applied by the input thread as they arrive (the
    engine's queue is thread-safe): an abort reaches even a monolithic pipeline
    in the middle of its one long step (its step callback checks it). The main
    thread only steps and sends.
    """

    def __init__(self, engine: Any, ctx: zmq.Context, input_addr: str, output: zmq.Socket) -> None:
        self.engine = engine
        self.output = output
        self._ctx = ctx
        self._input_addr = input_addr
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        #: request ids in the engine (failed together if a whole step raises)
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        #: request ids whose caller listens to their step events (the others get their final one only)
        self._listening: set[str] = set()
        #: (seconds, requests stepped) of the steps not yet reported, and the running count last sent
        self._steps: list[tuple[float, int]] = []
        self._sent_running = 0

    def send_events(self, events: list[Any], step_seconds: float) -> None:
        """Send a step's events: the step events of listened-to requests and every final event;
        nothing when that leaves none and the running count is unchanged (the step's metrics go
        with the next message)."""
        stepped = sum(e.kind == "step" for e in events)
        with self._known_lock:
            # final events settle a request; partial images (like steps) do not, and always cross
            final = {e.request_id for e in events if e.kind not in ("step", "partial")}
            shown = [e for e in events if e.kind != "step" or e.request_id in self._listening]
            self._known.difference_update(final)
            self._listening.difference_update(final)
        running = self.engine.num_running
        with self._send_lock:
            if stepped:
                self._steps.append((step_seconds, stepped))
            if not shown and running == self._sent_running:
                return
            buffers: list[Any] = []
            msgs = [_event_message(e, buffers) for e in shown]
            steps, self._steps, self._sent_running = self._steps, [], running
            self.output.send_multipart(frames_of(Events(steps, msgs, running), buffers), copy=False)

    def _receive(self) -> None:
        sock = self._ctx.socket(zmq.PULL)
        sock.connect(self._input_addr)
        while self._apply(sock.recv_multipart(copy=False)):
            self._wake.set()
        self._stopping = True
        self._wake.set()

    def _apply(self, frames: list[Any]) -> bool:
        """Apply one input message; False on Shutdown."""
        message, buffers = parse("to_core", frames)
        if isinstance(message, Shutdown):
            return False
        if isinstance(message, Abort):
            for rid in message.request_ids:
                self.engine.abort(rid)
            return True
        assert isinstance(message, AddRequests)
        refused, batch = [], []
        for req in message.requests:
            try:  # (a typed stage input crosses like the params: dataclass fields, tensors as raw frames)
                batch.append((req.request_id, codec.unpack(req.params, buffers), codec.unpack(req.stage_input, buffers)))
            except Exception as exc:  # noqa: BLE001 -- that request's own error, reported to its caller
                refused.append(_Refused(req.request_id, exc))
        with self._known_lock:  # known before the step that may finish them
            self._known.update(rid for rid, _, _ in batch)
            self._listening.update(req.request_id for req in message.requests if req.wants_steps)
        for (rid, _, _), result in zip(batch, self.engine.add_requests(batch)):
            if isinstance(result, Exception):
                refused.append(_Refused(rid, result))
        if refused:
            self.send_events(refused, 0.0)
        return True

    def _fail_all(self, exc: Exception) -> list[_Refused]:
        with self._known_lock:
            ids = sorted(self._known)
        for rid in ids:
            self.engine.abort(rid)
        return [_Refused(rid, exc) for rid in ids]

    def run(self) -> None:
        threading.Thread(target=self._receive, name="omni-engine-input", daemon=True).start()
        engine = self.engine
        engine.run_loop(lambda: self._stopping, self._wake, self._fail_all, self.send_events)
        # Shutdown: release what the requests left hold (aborted at the next step).
        with self._known_lock:
            ids = sorted(self._known)
        for rid in ids:
            engine.abort(rid)
        if engine.has_unfinished():
            engine.step()


class _Refused:
    """An error event for a request the engine could not take (or a step that raised)."""

    kind = "error"
    step = total = 0
    output = None

    def __init__(self, request_id: str, error: BaseException) -> None:
        self.request_id = request_id
        self.error = error


def _serve_rpc(engine: Any, ctx: zmq.Context, addr: str) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.connect(addr)
    while True:
        call, buffers = parse("call", sock.recv_multipart(copy=False))
        out: list[Any] = []
        try:
            if call.method == "resolve":
                value = engine.pipeline.resolve(codec.unpack(call.arg, buffers), engine.stage_defaults)
            elif call.method in ("load_lora", "unload_lora", "list_loras"):  # arg: the method's arguments
                value = getattr(engine, call.method)(*(codec.unpack(call.arg, buffers) or ()))
            elif call.method == "ping":
                value = os.getpid()
            else:
                raise ValueError(f"unknown engine-core call {call.method!r}")
            reply = Reply(call.call_id, codec.pack(value, out))
        except Exception as exc:  # noqa: BLE001 -- the caller's error (bad input), raised there
            out = []
            reply = Reply(call.call_id, None, codec.pack(exc, out))
        sock.send_multipart(frames_of(reply, out), copy=False)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            logger.error("the process that started this diffusion engine is gone; exiting")
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="diffusion engine core process (started by EngineCoreClient)")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--rpc", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    # The client owns this process's lifetime: Ctrl-C in the server's terminal reaches the whole
    # process group, and the server stops its engine itself (a SIGINT here would read as a crash).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to stderr
    logging.basicConfig(level=logging.INFO, format="(omni engine pid=%(process)d) %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(args.parent,), name="omni-engine-watchdog", daemon=True).start()

    ctx = zmq.Context()
    output = ctx.socket(zmq.PUSH)
    output.setsockopt(zmq.LINGER, 5000)
    output.connect(args.output)
    try:
        spec = codec.decode([sys.stdin.buffer.read()])
        if not isinstance(spec, EngineSpec):
            raise TypeError(f"expected an EngineSpec on stdin, got {type(spec).__name__}")
        engine = spec.launch()
    except BaseException as exc:  # noqa: BLE001 -- reported to the client, which raises it at start()
        buffers: list[Any] = []
        output.send_multipart(frames_of(StartFailed(codec.pack(exc, buffers), traceback.format_exc()), buffers))
        output.close()
        return 1
    core = EngineCore(engine, ctx, args.input, output)
    threading.Thread(target=_serve_rpc, args=(engine, ctx, args.rpc), name="omni-engine-rpc", daemon=True).start()
    buffers = []
    info = codec.pack(PipelineInfo.of(engine), buffers)
    output.send_multipart(frames_of(Ready(os.getpid(), info, "vllm" in sys.modules), buffers))
    logger.info("diffusion engine core serving %s (%s)", engine.pipeline.model_id, engine.pipeline.family)
    try:
        core.run()
    finally:
        engine.close()
        output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
