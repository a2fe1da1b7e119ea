"""The multi-stage orchestrator: a stage config's AR stage (vLLM) feeding its diffusion stage.

The stage config is the topology (stage_config.py): the `llm` stage is a
vLLM `AsyncLLM` built from its engine_args (on the checkpoint's `subfolder`,
with its `tokenizer_subfolder`), wired to the next stage by its `connector`;
the final `diffusion` stage is the diffusion engine behind an `EngineLoop`
holding at most `max_batch_size` requests; its `input_processor` names the
registered family code that turns the AR stage's output into the diffusion
stage's input (`INPUT_PROCESSORS`). A family supplies exactly that code, as a
subclass of `StageOrchestrator` implementing

    load_pipeline(model, dtype, device)        its diffusion stage
    hand_over(resolved, request_id, timings)   run the AR stage for one request
                                               and put its hand-over in the
                                               pipeline's keyed store

and everything else -- engines, queueing, cancellation, timings, text
answers -- is here, once. `create_orchestrator` picks the class from the
config; nothing here names a family.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..diffusion.engine import DiffusionEngine, EngineConfig
from ..diffusion.interface import StepwisePipeline
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from .engine_loop import EngineLoop, ProgressFn
from .stage_config import INPUT_PROCESSORS, StageConfig, StageSpec


@dataclass
class StageTimings:
    """Where one image request's wall time went (seconds); for the overhead benchmark."""

    ar_prefill: float = 0.0
    transfer: float = 0.0
    diffusion: float = 0.0
    total: float = 0.0
    transferred_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def orchestrator_class(config: StageConfig) -> type["StageOrchestrator"]:
    """The family orchestrator the config's final stage names by its input_processor."""
    name = config.final_stage.input_processor
    if name is None:
        raise ValueError(f"stage config {config.name!r}: its final stage names no input_processor")
    module, cls = INPUT_PROCESSORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


async def create_orchestrator(model: str, config: StageConfig, **kwargs: Any) -> "StageOrchestrator":
    """Build and start the orchestrator of `config` (call inside the event loop that will await it)."""
    return await orchestrator_class(config).create(model, config, **kwargs)


class StageOrchestrator(ABC):
    """Create inside a running event loop (`await Cls.create(...)`)."""

    def __init__(self, model: str, config: StageConfig, ar_engine_args: dict[str, Any] | None = None,
                 dtype: Any = None, device: Any = None, max_queue: int = 64) -> None:
        self.model = model
        self.config = config
        self.ar, self.dit = self._stages(config)
        self._transfer_dir: str | None = None
        self._ar_args = self._engine_args(self.ar, dict(ar_engine_args or {}))
        self.ar_defaults = dict(self.ar.default_sampling_params) if self.answers_text else None
        if device is None:
            device = _device_for(self.dit.devices)
        self.pipeline = self.load_pipeline(model, dtype=dtype, device=device)
        self.engine = DiffusionEngine(self.pipeline, EngineConfig(max_running=self.dit.max_batch_size),
                                      stage_defaults=self.dit.default_sampling_params or None)
        self.loop = EngineLoop(self.engine, max_queue)
        self.llm = None
        self._ids = itertools.count()

    #: True: the AR stage also answers text requests (its default_sampling_params apply)
    answers_text: bool = True

    @staticmethod
    def _stages(config: StageConfig) -> tuple[StageSpec, StageSpec]:
        llm = [s for s in config.stages if s.type == "llm"]
        final = config.final_stage
        if len(config.stages) != 2 or len(llm) != 1 or final.type != "diffusion" or final.inputs_from != llm[0].id:
            raise ValueError(f"stage config {config.name!r}: this orchestrator runs one llm stage feeding the final "
                             f"diffusion stage, got {[(s.id, s.type, s.inputs_from) for s in config.stages]}")
        return llm[0], final

    def _engine_args(self, stage: StageSpec, overrides: dict[str, Any]) -> dict[str, Any]:
        """The AR engine's arguments: the stage's engine_args < the caller's, plus the connector's wiring."""
        args = {**stage.engine_args, **overrides}
        if stage.tokenizer_subfolder is not None:
            args.setdefault("tokenizer", str(Path(self.model) / stage.tokenizer_subfolder))
        args.setdefault("max_num_seqs", stage.max_batch_size)
        if stage.connector == "omni_kv":
            self._transfer_dir = tempfile.mkdtemp(prefix="vllm-omni-kv-")
            kv = dict(args.get("kv_transfer_config") or {"kv_connector": "OmniKVConnector", "kv_role": "kv_producer"})
            kv["kv_connector_extra_config"] = {**kv.get("kv_connector_extra_config", {}),
                                               "transfer_dir": self._transfer_dir}
            args["kv_transfer_config"] = kv
        return args

    @property
    def ar_model(self) -> str:
        sub = self.ar.subfolder
        return str(Path(self.model) / sub) if sub else self.model

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> "StageOrchestrator":
        self = cls(*args, **kwargs)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = _with_devices(self.ar.devices, lambda: AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=self.ar_model, **self._ar_args)))
        self.loop.start()
        return self

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.loop.stop)
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # Collect it now: AsyncLLM.__del__ run at interpreter exit, after
            # module teardown, fails noisily.
            del llm
            gc.collect()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000)}"

    # ---- the family's part -----------------------------------------------------------
    @abstractmethod
    def load_pipeline(self, model: str, dtype: Any, device: Any) -> StepwisePipeline:
        """The diffusion stage's pipeline, with a keyed store for hand-overs."""

    @abstractmethod
    async def hand_over(self, resolved: ResolvedParams, request_id: str, timings: StageTimings) -> None:
        """Run the AR stage for one request and put its output in the pipeline's store under `request_id`."""

    @abstractmethod
    def discard_hand_over(self, request_id: str) -> None:
        """Drop a hand-over the diffusion stage did not take (the request failed or was cancelled)."""

    # ---- AR only -------------------------------------------------------------------
    async def generate_text(self, prompt: Any, sampling_params: Any = None, request_id: str | None = None):
        """text2text / img2text: the AR stage's final RequestOutput (vLLM's type)."""
        from vllm import SamplingParams as VllmSamplingParams

        if self.ar_defaults is None:
            raise ValueError(f"{self.config.name} answers with images only")
        params = sampling_params or VllmSamplingParams(**self.ar_defaults)
        final = None
        async for out in self.llm.generate(prompt, params, request_id or self.new_id(f"{self.config.name}-text")):
            final = out
        return final

    # ---- AR -> diffusion --------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> ResolvedParams:
        return self.pipeline.resolve(params, self.engine.stage_defaults)

    async def generate_image(self, params: SamplingParams | ResolvedParams, on_progress: ProgressFn | None = None,
                             request_id: str | None = None, timings: StageTimings | None = None) -> DiffusionOutput:
        timings = timings if timings is not None else StageTimings()
        started = time.perf_counter()
        resolved = params if isinstance(params, ResolvedParams) else self.resolve(params)
        rid = request_id or self.new_id(f"{self.config.name}-image")
        try:
            ar_started = time.perf_counter()
            await self.hand_over(resolved, rid, timings)
            timings.ar_prefill = time.perf_counter() - ar_started - timings.transfer
            diffusion_started = time.perf_counter()
            handle = self.loop.submit(resolved, on_progress, request_id=rid)
            try:
                output = await self.loop.result(handle)
            except asyncio.CancelledError:
                self.loop.abort(rid)  # the caller went away: free the DiT work at the next step
                raise
            timings.diffusion = time.perf_counter() - diffusion_started
        finally:
            self.discard_hand_over(rid)  # no-op once the stage took it
        timings.total = time.perf_counter() - started
        return output


def _device_for(devices: str) -> str:
    """The torch device of a stage's `devices` ("0" -> cuda:0 where CUDA exists, else cpu)."""
    import torch

    first = devices.split(",")[0]
    return f"cuda:{first}" if torch.cuda.is_available() else "cpu"


def _with_devices(devices: str | None, build):
    """Build the AR engine with CUDA_VISIBLE_DEVICES set to the stage's devices (its workers inherit it)."""
    import torch

    if not torch.cuda.is_available():
        return build()
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        return build()
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
