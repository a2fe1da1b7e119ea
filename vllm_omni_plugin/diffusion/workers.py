"""Start a diffusion engine on one device or on several ranks (multi-GPU DiT).

`launch_engine` is the one way an engine is built with DitOptions:

* one device: build the pipeline, apply fp8 if asked, wrap it in an engine;
* N ranks (`DitOptions.parallel.world_size > 1`): this process becomes rank 0
  (device cuda:0, or the CPU with gloo), N-1 worker processes are spawned, each
  builds the same pipeline on its own device and runs `DiffusionEngine.follow()`:
  rank 0's engine broadcasts its step plan and all ranks execute it together
  (parallel.py). `engine.close()` releases the workers and the process group.

`build` is a picklable callable `build(device) -> StepwisePipeline` (for example
`functools.partial(load_pipeline, path, dtype=...)` through `PipelineBuilder`):
each rank builds its own copy, so nothing big crosses process boundaries.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .acceleration import DitOptions, apply_dit_options, dit_modules
from .engine import DiffusionEngine, EngineConfig
from .interface import StepwisePipeline
from .parallel import IDLE_TIMEOUT, ParallelGroup, enable_sequence_parallel
from .params import SamplingParams


@dataclass(frozen=True)
class PipelineBuilder:
    """Picklable `build(device)`: `load_pipeline(path, dtype=dtype, device=device, **kwargs)`."""

    path: str
    dtype: Any = None
    kwargs: Mapping[str, Any] | None = None

    def __call__(self, device: torch.device) -> Any:
        from .loader import load_pipeline

        return load_pipeline(self.path, dtype=self.dtype, device=device, **dict(self.kwargs or {}))


@dataclass(frozen=True)
class LoaderBuilder:
    """Picklable `build(device)` of a family's own loader (a multi-stage family's DiT stage):
    `loader(path, dtype=dtype, device=device, **kwargs)`, `loader` named "module:function"."""

    loader: str
    path: str
    dtype: Any = None
    kwargs: Mapping[str, Any] | None = None

    def __call__(self, device: torch.device) -> Any:
        import importlib

        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)(self.path, dtype=self.dtype, device=device,
                                                              **dict(self.kwargs or {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device | str | None, rank: int) -> torch.device:
    """cuda:<rank> for a CUDA deployment (one GPU per rank), else the CPU."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.device("cuda", rank)
    return device


def init_rank(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA tensors plus gloo for CPU ones on CUDA, gloo on CPU.

    The gloo half matters for speed: diffusers' "anything" Ulysses exchanges the
    ranks' sequence lengths before every all-to-all (twice per attention) and
    does it over gloo on the host when the group has a CPU backend; on a
    NCCL-only group it is a device all-gather plus `.item()`, a host-device
    sync that stops the host from queueing ahead. Measured with NCCL alone on
    2x H200: Ulysses 2048^2 1.42x; the figure with this group is still to be
    measured (docs/benchmarks.md).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=IDLE_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )


def attach_parallel(pipeline: Any, options: DitOptions, device: torch.device) -> ParallelGroup:
    """Make `pipeline` one rank of the multi-GPU DiT: mesh, CFG split, diffusers sequence parallelism."""
    if not isinstance(pipeline, StepwisePipeline):
        raise ValueError(f"multi-GPU DiT needs a step-wise pipeline; {type(pipeline).__name__} runs whole requests")
    modules = dit_modules(pipeline)
    dtype = pipeline.prediction_dtype or (modules[0].dtype if modules else pipeline.dtype)
    group = ParallelGroup(options.parallel, device, dtype)
    for transformer in modules:
        enable_sequence_parallel(transformer, group)
    pipeline.parallel = group
    return group


def _worker_main(rank: int, world_size: int, port: int, device: torch.device, build: Callable, options: DitOptions,
                 engine_config: EngineConfig | None, stage_defaults: Any, threads: int) -> None:
    if device.type == "cpu":
        # Rank 0's CPU thread count, not torch's default (every core): ranks of one host that each
        # take every core spin in OpenMP against each other (BAGEL's tiny CFG-parallel step on 2
        # cores: 0.38 s with the default, 0.022 s with one thread per rank as rank 0 had).
        torch.set_num_threads(threads)
    init_rank(rank, world_size, port, device)
    try:
        pipeline = build(device)
        apply_dit_options(pipeline, options)
        attach_parallel(pipeline, options, device)
        DiffusionEngine(pipeline, engine_config, stage_defaults).follow()
    finally:
        dist.destroy_process_group()


class ParallelEngine(DiffusionEngine):
    """Rank 0's engine of a multi-rank DiT; owns the worker processes."""

    workers: list[Any]

    def close(self, force: bool = False) -> None:
        """Stop the worker ranks and leave the process group (idempotent).

        force: the ranks may be out of step (rank 0 was interrupted inside a
        step): terminate the workers without the stop broadcast, which could
        wait forever, and leave the process group to process exit.
        """
        if not getattr(self, "workers", None):
            return
        if not force:
            self.stop_followers()
        for proc in self.workers:
            proc.join(timeout=0 if force else 60)
            if proc.is_alive():
                proc.terminate()
        self.workers = []
        self.pipeline.parallel = None
        if not force:
            dist.destroy_process_group()


def launch_engine(
    build: Callable[[torch.device], Any],
    *,
    device: torch.device | str | None = None,
    options: DitOptions | None = None,
    engine_config: EngineConfig | None = None,
    stage_defaults: SamplingParams | Mapping[str, Any] | None = None,
    main_pipeline: Any = None,
) -> DiffusionEngine:
    """Build the pipeline (on every rank when parallel) and return rank 0's engine.

    Args:
        build: picklable `build(device) -> pipeline` (see PipelineBuilder).
        device: "cuda" / "cpu" / None (CUDA when available); ranks use cuda:<rank>.
        options: parallel degrees and quantization; None = one device, model dtype.
        engine_config, stage_defaults: as for DiffusionEngine.
        main_pipeline: rank 0's pipeline when already built on its device
            (benchmarks reuse their one-device pipeline); `build` then runs on the workers only.
    Returns:
        the engine to submit requests to; call `close()` on a ParallelEngine when done.
    """
    options = options or DitOptions()
    world = options.parallel.world_size
    if world > 1 and engine_config is not None and engine_config.lora is not None:
        raise ValueError("per-request LoRA is not served on a multi-GPU DiT (yet): its adapters would live on "
                         "rank 0 only")
    if world == 1:
        pipeline = main_pipeline or build(device)
        apply_dit_options(pipeline, options)
        return DiffusionEngine(pipeline, engine_config, stage_defaults)
    main_device = rank_device(device, 0)
    if main_device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"parallel DiT needs {world} GPUs, {torch.cuda.device_count()} visible")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; a parallel DiT engine owns it")
    port = free_port()
    ctx = mp.get_context("spawn")
    workers = []
    for rank in range(1, world):
        proc = ctx.Process(
            target=_worker_main,
            args=(rank, world, port, rank_device(device, rank), build, options, engine_config, stage_defaults,
                  torch.get_num_threads()),
            daemon=True,
        )
        proc.start()
        workers.append(proc)
    init_rank(0, world, port, main_device)
    pipeline = main_pipeline or build(main_device)
    apply_dit_options(pipeline, options)
    attach_parallel(pipeline, options, main_device)
    engine = ParallelEngine(pipeline, engine_config, stage_defaults)
    engine.workers = workers
    return engine


