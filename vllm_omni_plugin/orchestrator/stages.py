"""The multi-stage orchestrator: a stage config's AR stage (vLLM) feeding its diffusion stage.

The stage config is the topology (stage_config.py): the `llm` stage is a
vLLM engine built from its engine_args (with the overlay for this platform,
on the checkpoint's `subfolder`, with its `tokenizer_subfolder`), wired to the
next stage by its `connector`; the final `diffusion` stage is a diffusion
engine running at most `max_batch_size` requests, in its own process behind
`EngineCoreClient` (`engine_process=True`: the server's) or on a thread behind
`EngineLoop` (offline `Omni`'s default), the same calls either way; its
`input_processor` names the registered family code that turns the AR stage's
output into the diffusion stage's input (`Family.input_processor`). A family
supplies exactly that code, as a subclass of `StageOrchestrator` implementing

    pipeline_loader, pipeline_kwargs           its diffusion stage's loader, "module:function"
                                               (one that needs its stage input:
                                               `stage_input_required`), called where
                                               the stage runs
    hand_over(resolved, request_id, timings)   run the AR stage for one request and
                                               return the diffusion stage's typed input
                                               (the pipeline's `stage_input_type`), which
                                               is submitted with the request

and everything else -- engines, queueing, cancellation, timings and the
per-request breakdown line, text answers, stage failure -- is here, once.
Nothing here names a family.

Two ways to get the AR engine:

* offline (`Omni`): `await Cls.create(...)` starts an AsyncLLM the orchestrator
  owns; if its engine process dies, a supervisor task restarts it from the same
  engine args (requests meanwhile fail with `StageUnavailable`, a 503);
* the server (`vllm serve --omni`): `Cls.attach(...)` takes the engine client
  vLLM's own API server built (from `ar_stage_engine_args`); vLLM owns and
  stops it, and its server stops with a dead engine, as plain `vllm serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..diffusion.acceleration import DitOptions
from ..diffusion.engine import EngineConfig
from ..diffusion.interface import StepwisePipeline
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from ..diffusion.workers import LoaderBuilder
from ..engine.client import EngineCoreClient
from ..engine.spec import EngineSpec, PipelineInfo
from .ar_memory import fit_ar_engine_args, platform_name
from .stage_dtype import ar_dtype, dtype_name, model_dtype
from ..engine.handles import PartialFn
from .engine_loop import EngineLoop, ProgressFn, StageUnavailable
from ..registry import input_processors
from .stage_config import StageConfig, StageSpec

logger = logging.getLogger("vllm.omni_plugin.orchestrator")


@dataclass
class StageTimings:
    """Where one image request's wall time went (seconds); logged per request, read by the benchmarks."""

    ar_prefill: float = 0.0
    transfer: float = 0.0  # the hand-over: the producer's save + reading it (all branches)
    diffusion: float = 0.0  # queue + denoising steps + decode in the DiT stage
    decode: float = 0.0  # the VAE decode, part of `diffusion`
    total: float = 0.0
    transferred_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.transferred_bytes / self.transfer / 1e9 if self.transfer > 0 else 0.0
        return (f"ar_prefill {self.ar_prefill:.3f}s, kv hand-over {self.transfer:.3f}s "
                f"({self.transferred_bytes / 1e6:.1f} MB, {rate:.2f} GB/s), dit {self.diffusion - self.decode:.3f}s, "
                f"decode {self.decode:.3f}s, total {self.total:.3f}s")


def orchestrator_class(config: StageConfig) -> type["StageOrchestrator"]:
    """The family orchestrator the config's final stage names by its input_processor."""
    name = config.final_stage.input_processor
    if name is None:
        raise ValueError(f"stage config {config.name!r}: its final stage names no input_processor")
    family = input_processors()[name]
    return family.load(family.orchestrator)


async def create_orchestrator(model: str, config: StageConfig, **kwargs: Any) -> "StageOrchestrator":
    """Build and start the orchestrator of `config` (call inside the event loop that will await it)."""
    return await orchestrator_class(config).create(model, config, **kwargs)


def stage_pair(config: StageConfig) -> tuple[StageSpec, StageSpec]:
    """(the llm stage, the final diffusion stage it feeds); ValueError for any other topology."""
    llm = [s for s in config.stages if s.type == "llm"]
    final = config.final_stage
    if len(config.stages) != 2 or len(llm) != 1 or final.type != "diffusion" or final.inputs_from != llm[0].id:
        raise ValueError(f"stage config {config.name!r}: this orchestrator runs one llm stage feeding the final "
                         f"diffusion stage, got {[(s.id, s.type, s.inputs_from) for s in config.stages]}")
    return llm[0], final


def ar_model_path(model: str, stage: StageSpec) -> str:
    """The directory the AR engine loads: the checkpoint, or its `subfolder`."""
    return str(Path(model) / stage.subfolder) if stage.subfolder else str(model)


def ar_stage_engine_args(model: str, config: StageConfig, overrides: dict[str, Any] | None = None, *,
                         fit: bool = True) -> dict[str, Any]:
    """The AR stage's vLLM engine args.

    `overrides` (vLLM flags given explicitly) > the stage's `engine_args` with its
    `platform_engine_args` overlay for this platform; the tokenizer from its
    `tokenizer_subfolder`, `max_num_seqs` from its `max_batch_size`; for the
    `omni_kv` connector the OmniKVConnector with a fresh transfer directory (its
    files are deleted as they are read).

    Args:
        model: the checkpoint directory.
        config: the multi-stage stage config.
        overrides: engine args that win over the stage config's.
        fit: size the KV cache from what is free on the CPU build, unless the user
            sized it (orchestrator/ar_memory.py); what an engine about to start needs.

    Returns:
        keyword arguments for `AsyncEngineArgs` (without `model`: `ar_model_path`).

    Raises:
        ARStageDoesNotFit: (CPU, fit) one max_model_len sequence does not fit the free memory.
    """
    stage, _ = stage_pair(config)
    configured = stage.engine_args_for(platform_name())
    args = {**configured, **(overrides or {})}
    # one dtype rule for every stage (stage_dtype.py); `overrides` holds what was given explicitly
    args["dtype"] = ar_dtype(args.get("dtype") if "dtype" in (overrides or {}) else None, None,
                             configured.get("dtype"), config.dtype, platform_name())
    if stage.tokenizer_subfolder is not None:
        args.setdefault("tokenizer", str(Path(model) / stage.tokenizer_subfolder))
    args.setdefault("max_num_seqs", stage.max_batch_size)
    if stage.connector == "omni_kv":
        kv = dict(args.get("kv_transfer_config") or {"kv_connector": "OmniKVConnector", "kv_role": "kv_producer"})
        extra = dict(kv.get("kv_connector_extra_config") or {})
        extra.setdefault("transfer_dir", tempfile.mkdtemp(prefix="vllm-omni-kv-"))
        kv["kv_connector_extra_config"] = extra
        args["kv_transfer_config"] = kv
    return fit_ar_engine_args(ar_model_path(model, stage), args, stage.max_batch_size) if fit else args


def check_ar_engine(config: StageConfig, vllm_config: Any) -> None:
    """Refuse an AR engine that cannot hand its output to the diffusion stage (started without the
    stage config: e.g. plain `vllm serve` with the omni routes allowlisted, but without `--omni`).

    Raises:
        ValueError: naming what is missing and the command that sets it.
    """
    from ..kv import CONNECTOR_NAME

    stage, _ = stage_pair(config)
    if stage.connector != "omni_kv":
        return
    connector = getattr(vllm_config.kv_transfer_config, "kv_connector", None)
    if connector != CONNECTOR_NAME:
        raise ValueError(
            f"the AR engine runs with kv_connector={connector!r}, not {CONNECTOR_NAME!r}: {config.name} image "
            "generation needs the stage config's engine args; start the server with `vllm serve MODEL --omni`"
        )


def _new_ar_engine(model: str, ar_args: dict[str, Any], devices: str | None) -> Any:
    """An AsyncLLM for the AR stage (offline `create` and the supervisor's restarts)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return _with_devices(devices, lambda: AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **ar_args)))


class StageOrchestrator(ABC):
    """A family's AR stage -> diffusion stage; `await Cls.create(...)` or `Cls.attach(...)`."""

    #: True: the AR stage also answers text requests (its default_sampling_params apply)
    answers_text: bool = True

    #: the DiT stage's loader, "module:function" called as (model, dtype=, device=, **pipeline_kwargs)
    #: in the process that runs the stage (diffusion.workers.LoaderBuilder)
    pipeline_loader: str = ""
    pipeline_kwargs: dict[str, Any] = {}
    #: True where the family's DiT stage runs on several ranks (dit_options cfg_degree > 1: BAGEL)
    dit_parallel: bool = False

    def __init__(self, model: str, config: StageConfig, ar_engine_args: dict[str, Any] | None = None,
                 dtype: Any = None, device: Any = None, max_queue: int = 64, *, llm: Any = None,
                 owns_llm: bool = False, engine_process: bool = False) -> None:
        self.model = model
        self.config = config
        self.ar, self.dit = stage_pair(config)
        overrides = dict(ar_engine_args or {})
        if dtype_name(dtype) is not None:  # a model-wide explicit dtype reaches the AR stage too
            overrides.setdefault("dtype", dtype_name(dtype))
        self._ar_args = ar_stage_engine_args(model, config, overrides, fit=False)
        kv = self._ar_args.get("kv_transfer_config") or {}
        self._transfer_dir: str | None = (kv.get("kv_connector_extra_config") or {}).get("transfer_dir")
        self.ar_defaults = dict(self.ar.default_sampling_params) if self.answers_text else None
        if device is None:
            device = _device_for(self.dit.devices)
        import torch

        # the dtype each stage runs in (stage_dtype.py); `stage_dtypes` reports them as loaded
        dit_dtype = model_dtype(dtype, config.dtype, torch.device(device).type)
        self.llm = llm
        # The DiT stage's engine: what it builds crosses to its process by value (engine/spec.py); the
        # stage config's dit_options (compile, cfg_batch) are applied by the pipeline where it loads.
        options = DitOptions.from_dict(self.dit.dit_options)
        if options.parallel.world_size > 1 and not self.dit_parallel:
            raise ValueError(f"the {config.name} diffusion stage does not run on several ranks (dit_options "
                             "cfg_degree / --omni-cfg-parallel-size)")
        spec = EngineSpec(LoaderBuilder(self.pipeline_loader, model, dit_dtype, dict(self.pipeline_kwargs)),
                          device=str(device), options=options,
                          engine_config=EngineConfig(max_running=self.dit.max_batch_size),
                          stage_defaults=self.dit.default_sampling_params or None, stage=self.dit.id)
        #: True: the DiT stage runs in its own process behind `EngineCoreClient` (the server's);
        #: False: on a thread of this one (`EngineLoop`; offline `Omni`'s default, notebooks)
        self.engine_process = engine_process
        if engine_process:
            self.client: EngineCoreClient | EngineLoop = EngineCoreClient(spec, max_queue)
            self.client.start()  # blocking: until the DiT stage's process has loaded its pipeline
            #: the stage's pipeline and engine (None when they live in the stage's process)
            self.pipeline = self.engine = None
            self.info = self.client.info
        else:
            self.engine = spec.launch()
            self.pipeline = self.engine.pipeline
            self.client = EngineLoop(self.engine, max_queue)
            #: what callers read about the DiT stage's pipeline wherever it runs (family, declaration, dtype)
            self.info = PipelineInfo.of(self.engine)
        logger.info("omni: %s stage dtypes: %s", config.name,
                    ", ".join(f"{stage}={name}" for stage, name in self.stage_dtypes.items()))
        self._owns_llm = owns_llm
        self._ids = itertools.count()
        self.ar_status = "running"  # running | restarting | failed
        self.ar_restarts = 0
        self.max_ar_restarts = 3
        self._supervisor: asyncio.Task | None = None

    @property
    def stage_dtypes(self) -> dict[str, str]:
        """The dtype each stage runs in, by stage id: the AR stage's as its vLLM engine resolved it
        (before an offline engine starts: what it is started with), the DiT's from its loaded weights."""
        if self.llm is None:
            ar = self._ar_args["dtype"]
        elif hasattr(self.llm, "vllm_config"):
            ar = dtype_name(self.llm.vllm_config.model_config.dtype)
        else:  # the AR stage on other hosts (orchestrator/remote.py): what they report, once one has
            ar = getattr(self.llm, "dtype", None) or "unknown (remote AR stage)"
        return {self.ar.id: ar, self.dit.id: self.info.dtype}

    @property
    def ar_max_model_len(self) -> int | None:
        """The AR stage's max_model_len: its engine's, or what the AR servers on other hosts report
        (orchestrator/remote.py; None before one answered: the AR server then checks it)."""
        config = getattr(self.llm, "model_config", None)
        return config.max_model_len if config is not None else getattr(self.llm, "max_model_len", None)

    @property
    def ar_model(self) -> str:
        return ar_model_path(self.model, self.ar)

    @classmethod
    async def create(cls, model: str, config: StageConfig, ar_engine_args: dict[str, Any] | None = None,
                     **kwargs: Any) -> "StageOrchestrator":
        """Offline: start an AsyncLLM for the AR stage (stage config engine args < `ar_engine_args`)."""
        self = cls(model, config, ar_engine_args, owns_llm=True, **kwargs)
        # CPU: a KV cache that fits what is free, unless the user sized it (ar_memory.py).
        try:
            self._ar_args = fit_ar_engine_args(self.ar_model, self._ar_args, self.ar.max_batch_size)
            self.llm = _new_ar_engine(self.ar_model, self._ar_args, self.ar.devices)
        except BaseException:
            self.client.stop()  # no DiT process left behind by an AR stage that did not start
            raise
        self.start()
        self._supervisor = asyncio.create_task(self._supervise_ar())
        return self

    @property
    def loop(self) -> "EngineCoreClient | EngineLoop":
        """The DiT stage's engine client (the name from when it was always an EngineLoop)."""
        return self.client

    @classmethod
    def attach(cls, model: str, config: StageConfig, llm: Any, **kwargs: Any) -> "StageOrchestrator":
        """Around an AR engine client that exists (vLLM's own server's; call inside the running event loop)."""
        check_ar_engine(config, llm.vllm_config)
        self = cls(model, config, llm=llm, owns_llm=False, **kwargs)
        self.start()
        return self

    @classmethod
    def attach_remote(cls, model: str, config: StageConfig, remote: Any, **kwargs: Any) -> "StageOrchestrator":
        """Around the AR servers of `--omni-stage dit` (orchestrator/remote.py: `RemoteAR`); its engine
        loop starts with `start()`, on the server's event loop."""
        return cls(model, config, llm=remote, owns_llm=False, **kwargs)

    def start(self) -> None:
        """Start the DiT stage's engine loop if it is not running (call inside the running event loop)."""
        if isinstance(self.client, EngineLoop) and not self.client.alive:
            self.client.start()

    # ---- the AR stage's health -------------------------------------------------------
    @property
    def ar_alive(self) -> bool:
        return self.ar_status == "running" and self.llm is not None and not self.llm.errored

    def health(self) -> str | None:
        """None while both stages serve; otherwise what is down, for /health."""
        if isinstance(self.client, EngineCoreClient):
            down = self.client.health()  # its process died (restarting) or could not be restarted
            if down is not None:
                return down
        elif not self.client.alive:
            return f"the {self.dit.id} stage's diffusion engine is not running"
        if self.ar_alive:
            return None
        if self.ar_status == "failed":
            return (f"the AR stage's engine (vLLM EngineCore) died {self.ar_restarts + 1} times and is not "
                    "restarted again; restart the server")
        if not self._owns_llm:
            return "the AR stage's engine (vLLM EngineCore) died; vLLM's server stops with it: restart the server"
        return "the AR stage's engine (vLLM EngineCore) died; the server is restarting it"

    async def _supervise_ar(self, period: float = 0.5) -> None:
        """Restart an AR engine this orchestrator started when its process dies (vLLM's monitor marks it errored)."""
        while True:
            await asyncio.sleep(period)
            if self.llm is None or not self.llm.errored:
                continue
            if self.ar_restarts >= self.max_ar_restarts:
                logger.error("omni: the AR stage's engine died again after %d restarts; not restarting it",
                             self.ar_restarts)
                self.ar_status = "failed"
                return
            logger.error("omni: the AR stage's engine died; restarting it (restart %d of at most %d)",
                         self.ar_restarts + 1, self.max_ar_restarts)
            self.ar_status = "restarting"
            self.ar_restarts += 1
            dead, self.llm = self.llm, None
            await asyncio.to_thread(dead.shutdown)
            del dead
            gc.collect()
            try:
                # Off the event loop: the server answers (503 for AR work) while the engine loads.
                self.llm = await asyncio.to_thread(_new_ar_engine, self.ar_model, self._ar_args, self.ar.devices)
            except (RuntimeError, ValueError, OSError) as e:
                logger.error("omni: restarting the AR stage's engine failed: %s", e)
                self.ar_status = "failed"
                return
            self.ar_status = "running"
            logger.info("omni: the AR stage's engine is running again")

    def ar_engine(self) -> Any:
        """The running AR engine (vLLM AsyncLLM); StageUnavailable while it is down."""
        if not self.ar_alive:
            raise StageUnavailable(self.health() or "the AR stage is not running")
        return self.llm

    async def _run_ar(self, prompt: Any, params: Any, request_id: str) -> Any:
        """The one call into the AR engine: its final RequestOutput; a dead engine is StageUnavailable."""
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        try:
            async for out in self.ar_engine().generate(prompt, params, request_id):
                final = out
        except EngineDeadError as e:
            then = "the server is restarting it, retry shortly" if self._owns_llm else "restart the server"
            raise StageUnavailable(f"the AR stage's engine (vLLM EngineCore) died while running request "
                                   f"{request_id}; {then}") from e
        return final

    async def shutdown(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await asyncio.to_thread(self.client.stop)
        llm, self.llm = self.llm, None
        if llm is not None and self._owns_llm:
            llm.shutdown()
            # Collect it now: AsyncLLM.__del__ run at interpreter exit, after
            # module teardown, fails noisily.
            del llm
            gc.collect()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000)}"

    # ---- the family's part -----------------------------------------------------------
    @classmethod
    def load_pipeline(cls, model: str, dtype: Any, device: Any) -> StepwisePipeline:
        """The diffusion stage's pipeline (`pipeline_loader`), here; it requires its stage input
        (`stage_input_required`). The stage itself loads it where it runs (`LoaderBuilder`)."""
        return LoaderBuilder(cls.pipeline_loader, model, dtype, dict(cls.pipeline_kwargs))(device)

    @abstractmethod
    async def hand_over(self, resolved: ResolvedParams, request_id: str, timings: StageTimings) -> Any:
        """Run the AR stage for one request; the diffusion stage's input for it (the one function
        that builds it from the canonical request and the AR stage's output).

        Returns:
            an instance of the pipeline's `stage_input_type`, keyed by `request_id`.
        """

    # ---- AR only -------------------------------------------------------------------
    async def generate_text(self, prompt: Any, sampling_params: Any = None, request_id: str | None = None):
        """text2text / img2text: the AR stage's final RequestOutput (vLLM's type)."""
        from vllm import SamplingParams as VllmSamplingParams

        if self.ar_defaults is None:
            raise ValueError(f"{self.config.name} answers with images only")
        params = sampling_params or VllmSamplingParams(**self.ar_defaults)
        return await self._run_ar(prompt, params, request_id or self.new_id(f"{self.config.name}-text"))

    # ---- AR -> diffusion --------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> ResolvedParams:
        """The request resolved by the DiT stage's pipeline with its stage defaults (a round trip to
        its process when it runs in one)."""
        if isinstance(self.client, EngineCoreClient):
            return self.client.resolve(params)
        return self.pipeline.resolve(params, self.engine.stage_defaults)

    async def generate_image(self, params: SamplingParams | ResolvedParams, on_progress: ProgressFn | None = None,
                             request_id: str | None = None, timings: StageTimings | None = None,
                             on_partial: PartialFn | None = None) -> DiffusionOutput:
        """AR stage, hand-over, DiT stage; `on_partial(index, images)` gets the DiT's partial images
        (a request with `partial_images`, families that declare them; on this event loop)."""
        timings = timings if timings is not None else StageTimings()
        started = time.perf_counter()
        resolved = params if isinstance(params, ResolvedParams) else self.resolve(params)
        rid = request_id or self.new_id(f"{self.config.name}-image")
        if not self.client.alive:  # the DiT stage is down (its process restarting): no AR work for nothing
            raise StageUnavailable(self.health() or f"the {self.dit.id} stage is not running")
        ar_started = time.perf_counter()
        stage_input = await self.hand_over(resolved, rid, timings)
        timings.ar_prefill = time.perf_counter() - ar_started - timings.transfer
        diffusion_started = time.perf_counter()
        try:
            handle = self.client.submit(resolved, on_progress, request_id=rid, stage_input=stage_input,
                                        on_partial=on_partial)
            try:
                output = await self.client.result(handle)
            except asyncio.CancelledError:
                self.client.abort(rid)  # the caller went away: free the DiT work at the next step
                raise
        except BaseException:
            # what the hand-over left in a store for the DiT stage and it never read (refused,
            # aborted, its process died): freed here (a no-op for what it read)
            discard = getattr(stage_input, "discard", None)
            if discard is not None:
                discard()
            raise
        timings.diffusion = time.perf_counter() - diffusion_started
        timings.decode = output.timings.get("decode", 0.0)
        timings.transfer += output.timings.get("context_load", 0.0)  # the DiT stage's read of the hand-over
        output.dtypes = self.stage_dtypes
        timings.total = time.perf_counter() - started
        logger.info("omni request %s: %s", rid, timings.summary())
        return output


def _device_for(devices: str) -> str:
    """The torch device of a stage's `devices` ("0" -> cuda:0 where CUDA exists, else cpu)."""
    import torch

    first = devices.split(",")[0]
    return f"cuda:{first}" if torch.cuda.is_available() else "cpu"


def _with_devices(devices: str | None, build):
    """Build the AR engine with CUDA_VISIBLE_DEVICES set to the stage's devices (its workers inherit it)."""
    import torch

    if not torch.cuda.is_available() or devices is None:
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
