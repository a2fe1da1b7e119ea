"""Whole-transformer CUDA graphs, one per bucket of input shapes (dit_options `cuda_graphs`).

Small requests (8 x 512^2) are launch-bound: a Qwen-Image step issues ~60 block calls of
dozens of kernels each, and the GPU waits on the host between them. One CUDA graph of the
WHOLE transformer forward replays all of them with one launch.

Why not torch's own CUDA graphs (`mode="reduce-overhead"`): with regional compile all blocks
are one compiled function, and torch's CUDA-graph trees overwrote one block's output with the
next block's replay (H200, docs/benchmarks.md). Here there is one graph per forward, and its
output is cloned out before the call returns, so no caller ever holds memory the next replay
writes (`GraphedForward.__call__`; the interleaved-requests test fails without the clone).

What is captured: the module's forward as it is -- eager, or with its blocks regionally compiled
(`compile: regional`, inductor's default mode: no CUDA-graph trees). Compiled inside is the fast
form (the fusions cut GPU time, the graph cuts host time); the warm-up forwards before capture
run on the exact static shapes, so dynamo compiles (and guards pass) before capture begins.

Buckets. A call is keyed on: the row count padded up to a power of two; every tensor argument's
shape past the rows, dtype and device; every python argument (`img_shapes`, `attention_kwargs`,
`return_dict`). Tensors whose first dimension is the batch are per-row inputs and get padded
with copies of real rows (finite values; a DiT's rows are independent, so the real rows'
results do not depend on them -- tests/diffusion/test_cuda_graphs.py measures it); per-row
python lists (one `img_shapes` entry per row) must have equal entries. Text length is part of
the key exactly: padding text to a bucket would need the attention mask on every forward, which
moves SDPA off its flash kernel, and masked keys change the softmax's summation (rounding).
A bucket is captured on its second use (a one-off batch composition costs no capture) and at
most `max_graphs` graphs live at once; the least recently used one is released (its memory
pool goes back to the allocator). Everything else -- positional arguments, tensors inside
python containers, `return_dict` not False, a caller inside `off(...)` (step caching and
per-row LoRA, whose per-forward row plans are host data) -- runs the module's forward, counted
per reason in `GraphStats.fallbacks`.

One function differs between the GPU and CPU tests: `capture`. On CUDA it is
`capture_cuda_graph` (torch.cuda.graph); the CPU tests pass `replay_by_call`, whose "replay"
runs the forward on the same static buffers and writes the same static output tensors.
Bucketing, padding, copy-in, clone-out and eviction are the same code on both; the capture
itself (and that the forward has nothing a capture refuses) is verified on the GPU only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRAPHS = 8
#: forwards on the static buffers (side stream) before capture: lazy initialisation (cuBLAS
#: workspaces, dynamo compiles, diffusers' RoPE lru-caches) happens outside the graph
WARMUP_FORWARDS = 2
#: a bucket is captured on this use (earlier uses run the module's forward)
CAPTURE_ON_USE = 2
_SEEN_LIMIT = 256

Outputs = tuple[torch.Tensor, ...]
#: capture(run) -> (static outputs, replay, release); `run()` computes the forward on the static inputs
Capture = Callable[[Callable[[], Outputs]], tuple[Outputs, Callable[[], None], Callable[[], None]]]


def capture_cuda_graph(run: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None], Callable[[], None]]:
    """torch's recipe: warm-up on a side stream, then one capture into the graph's own memory pool."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_FORWARDS):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the engine's partial-image decodes run on another thread and stream meanwhile;
    # "global" would make their CUDA calls fail the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = run()
    return outputs, graph.replay, graph.reset


def replay_by_call(run: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None], Callable[[], None]]:
    """The CPU tests' `capture`: a replay runs the forward again and writes the SAME static outputs,
    as a graph replay does (so a result not cloned out would be overwritten by the next replay)."""
    outputs = run()

    def replay() -> None:
        for static, new in zip(outputs, run()):
            static.copy_(new)

    return outputs, replay, lambda: None


def padded_rows(rows: int) -> int:
    """The bucket's row count: the next power of two (1, 2, 4, 8, 16, ...)."""
    return 1 << max(rows - 1, 0).bit_length()


_off = threading.local()


@contextlib.contextmanager
def off(reason: str) -> Iterator[None]:
    """Every GraphedForward called inside runs its module's forward (counted under `reason`)."""
    previous = getattr(_off, "reason", None)
    _off.reason = reason
    try:
        yield
    finally:
        _off.reason = previous


@dataclass
class GraphStats:
    captured: int = 0
    replays: int = 0
    evicted: int = 0
    fallbacks: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"captured": self.captured, "replays": self.replays, "evicted": self.evicted,
                "fallbacks": dict(self.fallbacks)}


class _Unsupported(Exception):
    """A call outside the buckets; the message is the fallback reason."""


def _freeze(value: Any) -> Any:
    """A python argument as a hashable key part; tensors inside containers are not bucketable."""
    if isinstance(value, torch.Tensor):
        raise _Unsupported("a tensor inside a python argument")
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    raise _Unsupported(f"an argument of type {type(value).__name__}")


@dataclass
class _Plan:
    key: tuple
    rows: int
    padded: int
    row_tensors: dict[str, torch.Tensor]  # per-row inputs (first dim = rows)
    tensors: dict[str, torch.Tensor]  # other tensors, copied whole
    python: dict[str, Any]  # python arguments, per-row lists already padded


@dataclass
class _Graph:
    inputs: dict[str, torch.Tensor]
    outputs: Outputs
    replay: Callable[[], None]
    release: Callable[[], None]


class GraphedForward:
    """Installed as a transformer's `forward` (`install`); see the module docstring.

    forward: the module's own bound forward (what fallbacks and captures run).
    """

    def __init__(self, forward: Callable[..., Any], max_graphs: int = DEFAULT_MAX_GRAPHS,
                 capture: Capture = capture_cuda_graph, batch_arg: str = "hidden_states") -> None:
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"cuda_graph_max must be a positive integer, got {max_graphs!r}")
        self.forward = forward
        self.max_graphs = max_graphs
        self.capture = capture
        self.batch_arg = batch_arg
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # uses of buckets not captured yet
        self.stats = GraphStats()

    # ---- planning ---------------------------------------------------------------------
    def _plan(self, args: tuple, kwargs: dict[str, Any]) -> _Plan:
        if args:
            raise _Unsupported("positional arguments")
        if kwargs.get("return_dict", True) is not False:
            raise _Unsupported("return_dict is not False")
        batch = kwargs.get(self.batch_arg)
        if not isinstance(batch, torch.Tensor):
            raise _Unsupported(f"no {self.batch_arg} tensor")
        rows = batch.shape[0]
        padded = padded_rows(rows)
        key: list[Any] = [padded]
        row_tensors, tensors, python = {}, {}, {}
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                per_row = value.dim() > 0 and value.shape[0] == rows
                (row_tensors if per_row else tensors)[name] = value
                shape = tuple(value.shape[1:]) if per_row else tuple(value.shape)
                key.append((name, per_row, shape, value.dtype, value.device))
            elif isinstance(value, list) and len(value) == rows and rows > 1:
                frozen = _freeze(value[0])
                if any(_freeze(v) != frozen for v in value[1:]):
                    raise _Unsupported(f"per-row {name} entries differ")
                python[name] = [value[0]] * padded
                key.append((name, "rows", frozen))
            else:
                python[name] = value
                key.append((name, _freeze(value)))
        return _Plan(tuple(key), rows, padded, row_tensors, tensors, python)

    # ---- the call -----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = getattr(_off, "reason", None)
        if reason is None:
            try:
                plan = self._plan(args, kwargs)
            except _Unsupported as exc:
                reason = str(exc)
        if reason is not None:
            if not self.stats.fallbacks[reason]:
                logger.info("CUDA graphs: a forward runs without a graph (%s); GraphStats.fallbacks counts them", reason)
            self.stats.fallbacks[reason] += 1
            return self.forward(*args, **kwargs)
        graph = self.graphs.get(plan.key)
        if graph is None:
            uses = self._seen.pop(plan.key, 0) + 1
            if uses < CAPTURE_ON_USE:
                self._seen[plan.key] = uses
                while len(self._seen) > _SEEN_LIMIT:
                    self._seen.popitem(last=False)
                self.stats.fallbacks["first use of a bucket"] += 1
                return self.forward(**kwargs)
            graph = self._capture(plan)
        else:
            self.graphs.move_to_end(plan.key)
            self._copy_in(graph, plan)
        graph.replay()
        self.stats.replays += 1
        # Cloned out: the next replay of this bucket overwrites graph.outputs in place.
        result = tuple(out[: plan.rows].clone() for out in graph.outputs)
        assert all(r.data_ptr() != o.data_ptr() for r, o in zip(result, graph.outputs))
        return result

    def _copy_in(self, graph: _Graph, plan: _Plan) -> None:
        for name, value in plan.row_tensors.items():
            graph.inputs[name][: plan.rows].copy_(value)
        for name, value in plan.tensors.items():
            graph.inputs[name].copy_(value)

    def _capture(self, plan: _Plan) -> _Graph:
        while len(self.graphs) >= self.max_graphs:
            _, old = self.graphs.popitem(last=False)
            old.release()
            self.stats.evicted += 1
            logger.info("CUDA graph evicted (cuda_graph_max=%d reached)", self.max_graphs)
        inputs: dict[str, torch.Tensor] = {}
        for name, value in plan.row_tensors.items():
            # rows past the real ones are copies of real rows: finite values whose results are discarded
            repeat = [0] * (plan.padded - plan.rows)
            inputs[name] = torch.cat([value, value[repeat]]).contiguous() if repeat else value.clone()
        for name, value in plan.tensors.items():
            inputs[name] = value.clone()
        python = plan.python

        def run() -> Outputs:
            out = self.forward(**python, **inputs)
            if not isinstance(out, tuple) or not all(isinstance(o, torch.Tensor) for o in out):
                raise TypeError(f"a graphed forward must return a tuple of tensors, got {type(out).__name__}")
            if any(o.shape[0] != plan.padded for o in out):
                raise TypeError("a graphed forward's outputs must have one row per input row")
            return out

        outputs, replay, release = self.capture(run)
        graph = _Graph(inputs, outputs, replay, release)
        self.graphs[plan.key] = graph
        self.stats.captured += 1
        logger.info("CUDA graph captured: %d rows (bucket %d), %d graphs", plan.rows, plan.padded, len(self.graphs))
        return graph

    def release(self) -> None:
        """Free every graph (and its memory pool)."""
        while self.graphs:
            self.graphs.popitem(last=False)[1].release()
        self._seen.clear()


def install(transformer: torch.nn.Module, max_graphs: int = DEFAULT_MAX_GRAPHS,
            capture: Capture = capture_cuda_graph) -> GraphedForward:
    """Route `transformer`'s forward through a GraphedForward (idempotent: an installed one is returned)."""
    current = transformer.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(transformer.forward, max_graphs, capture)
    transformer.forward = graphed
    return graphed


def uninstall(transformer: torch.nn.Module) -> None:
    """Release the graphs and give the transformer its own forward back."""
    current = transformer.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        current.release()
        del transformer.forward


def stats(modules: Sequence[torch.nn.Module]) -> dict[str, Any] | None:
    """The graph counters of the installed GraphedForwards, summed (None when none is installed)."""
    found = [m.__dict__["forward"] for m in modules if isinstance(m.__dict__.get("forward"), GraphedForward)]
    if not found:
        return None
    total = GraphStats()
    for g in found:
        total.captured += g.stats.captured
        total.replays += g.stats.replays
        total.evicted += g.stats.evicted
        total.fallbacks.update(g.stats.fallbacks)
    return total.to_dict()
