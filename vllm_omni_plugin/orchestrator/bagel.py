"""BAGEL's two stages in one process: the AR stage on vLLM's AsyncLLM, the DiT stage inline.

    text2text / img2text   the AR stage answers; nothing else runs
    text2img               AR prefills the prompt context ([<|im_start|>] prompt
                           [<|im_end|>]) with the OmniKVConnector asking for its KV;
                           the transfer (K/V per layer + keyed metadata) becomes the
                           `cond` branch of a BagelContext; the text-CFG branch is
                           BAGEL's empty context, or a second AR prefill of the
                           negative prompt; the context is put in the DiT stage's
                           store under the request id, then the request is queued
    img2img                three AR prefills, BAGEL's img2img contexts:
                             cond     = VAE block, ViT block, [<|im_start|>] prompt [<|im_end|>]
                             cfg_text = VAE block, ViT block (+ the negative prompt's text block)
                             cfg_img  = [<|im_start|>] prompt [<|im_end|>]
                           the VAE block is the edit image resized to the output
                           (height, width) as a `vae_image` input (OmniBagel's
                           generation expert), the ViT block the edit image resized
                           to the ViT's square input, as encode_context does; the AR
                           stage must take `vae_image` inputs (its limit_mm_per_prompt)

Every hand-over is keyed by request id (principle 6): the AR requests are named
`<id>:cond` / `<id>:cfg_text` / `<id>:cfg_img`, each transfer is taken from its
own output, and the context is stored under `<id>` before the DiT request exists.

Stages fail alone. If the AR stage's engine process dies (vLLM's monitor marks
the AsyncLLM errored), the requests it was serving fail with `StageUnavailable`
(a 503 naming the stage) and `health()` says so. An engine the orchestrator
started itself (offline, `create`) is restarted by a supervisor task from the
same engine args (off the event loop); requests during the restart get the same
503, later ones run; after `max_ar_restarts` deaths the stage stays down. An
engine client that vLLM's own API server owns (`attach`, `vllm serve --omni`)
is vLLM's to handle: its server stops when its engine dies, as plain
`vllm serve` does (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH keeps it up, answering 503s).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..diffusion.bagel.context import BagelContext, BranchKV
from ..diffusion.bagel.encode import BOS, EOI, EOS, SOI, empty_branch, text_block_ids
from ..diffusion.output import DiffusionOutput
from ..diffusion.params import ResolvedParams, SamplingParams
from ..diffusion.pipelines.bagel import load_bagel_pipeline
from ..diffusion.engine import DiffusionEngine
from ..kv.store import request_params, take_transferred
from .ar_memory import fit_ar_engine_args, platform_name
from .engine_loop import EngineLoop, ProgressFn, StageUnavailable
from .stage_config import StageConfig

logger = logging.getLogger("vllm.omni_plugin.orchestrator")


@dataclass
class StageTimings:
    """Where one image request's wall time went (seconds); logged per request, read by the benchmarks."""

    ar_prefill: float = 0.0
    transfer: float = 0.0  # reading the handed-over KV (all branches)
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


def ar_stage_engine_args(config: StageConfig, overrides: dict[str, Any] | None = None,
                         model: str | None = None) -> dict[str, Any]:
    """The AR stage's vLLM engine args: `overrides` (vLLM flags given explicitly) > the stage config's
    `engine_args` with its `platform_engine_args` overlay for this platform, with a fresh transfer
    directory for the OmniKVConnector (its files are deleted as they are read).

    Args:
        config: the multi-stage stage config (its `ar` stage).
        overrides: engine args that win over the stage config's.
        model: the checkpoint directory; given, the CPU build sizes the KV cache from what is
            free unless the user sized it (orchestrator/ar_memory.py).

    Returns:
        keyword arguments for `AsyncEngineArgs` (without `model`).

    Raises:
        ARStageDoesNotFit: (CPU) one max_model_len sequence does not fit the free memory.
    """
    ar = config.stage("ar")
    args = {**ar.engine_args_for(platform_name()), **(overrides or {})}
    kv = dict(args.get("kv_transfer_config") or {})
    extra = dict(kv.get("kv_connector_extra_config") or {})
    extra.setdefault("transfer_dir", tempfile.mkdtemp(prefix="vllm-omni-kv-"))
    kv["kv_connector_extra_config"] = extra
    args["kv_transfer_config"] = kv
    return fit_ar_engine_args(model, args, ar.max_batch_size) if model is not None else args


def _new_ar_engine(model: str, ar_args: dict[str, Any]) -> Any:
    """An AsyncLLM for the AR stage (offline `create` and the supervisor's restarts)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **ar_args))


def check_ar_engine(vllm_config: Any) -> None:
    """Refuse an AR engine that cannot hand its KV to the DiT stage (started without the stage
    config: e.g. plain `vllm serve` with the omni routes allowlisted, but without `--omni`).

    Raises:
        ValueError: naming what is missing and the command that sets it.
    """
    from ..kv import CONNECTOR_NAME

    connector = getattr(vllm_config.kv_transfer_config, "kv_connector", None)
    if connector != CONNECTOR_NAME:
        raise ValueError(
            f"the AR engine runs with kv_connector={connector!r}, not {CONNECTOR_NAME!r}: BAGEL image "
            "generation needs the stage config's engine args; start the server with `vllm serve MODEL --omni`"
        )


class BagelOrchestrator:
    """BAGEL's stages around one AR engine client (vLLM's `EngineClient`: an `AsyncLLM`).

    Offline: `await BagelOrchestrator.create(...)` (inside a running event loop) starts its own
    AsyncLLM and shuts it down in `shutdown()`. The server: `BagelOrchestrator.attach(...)` takes the
    engine client vLLM's own API server created (`vllm serve --omni`), which vLLM owns and stops.
    """

    def __init__(self, model: str, config: StageConfig, llm: Any, *, owns_llm: bool,
                 dtype: Any = None, device: Any = None, max_queue: int = 64) -> None:
        self.model = model
        self.config = config
        dit = config.stage("dit")
        self.ar_defaults = dict(config.stage("ar").default_sampling_params)
        self.pipeline = load_bagel_pipeline(model, dtype=dtype, device=device)
        self.engine = DiffusionEngine(self.pipeline, stage_defaults=dit.default_sampling_params or None)
        self.loop = EngineLoop(self.engine, max_queue)
        self.llm = llm
        self._owns_llm = owns_llm
        self._ids = itertools.count()
        self._ar_args: dict[str, Any] = {}  # the engine args of an engine it started (restarts reuse them)
        self.ar_status = "running"  # running | restarting | failed
        self.ar_restarts = 0
        self.max_ar_restarts = 3
        self._supervisor: asyncio.Task | None = None

    @classmethod
    async def create(cls, model: str, config: StageConfig, ar_engine_args: dict[str, Any] | None = None,
                     **kwargs: Any) -> "BagelOrchestrator":
        """Offline: start an AsyncLLM for the AR stage (stage config engine args + `ar_engine_args`)."""
        ar_args = ar_stage_engine_args(config, ar_engine_args, model)
        self = cls.attach(model, config, _new_ar_engine(model, ar_args), owns_llm=True, **kwargs)
        self._ar_args = ar_args
        self._supervisor = asyncio.create_task(self._supervise_ar())
        return self

    @classmethod
    def attach(cls, model: str, config: StageConfig, llm: Any, *, owns_llm: bool = False,
               **kwargs: Any) -> "BagelOrchestrator":
        """Around an AR engine client that exists (call inside the running event loop)."""
        check_ar_engine(llm.vllm_config)
        self = cls(model, config, llm, owns_llm=owns_llm, **kwargs)
        self.loop.start()
        return self

    @property
    def ar_alive(self) -> bool:
        return self.ar_status == "running" and self.llm is not None and not self.llm.errored

    def health(self) -> str | None:
        """None while both stages serve; otherwise what is down, for /health."""
        if not self.loop.alive:
            return "the DiT stage's diffusion engine is not running"
        if self.ar_alive:
            return None
        if self.ar_status == "failed":
            return (f"the AR stage's engine (vLLM EngineCore) died {self.ar_restarts + 1} times and is not "
                    "restarted again; restart the server")
        if not self._owns_llm:
            return "the AR stage's engine (vLLM EngineCore) died; vLLM's server stops with it: restart the server"
        return "the AR stage's engine (vLLM EngineCore) died; the server is restarting it"

    async def _supervise_ar(self, period: float = 0.5) -> None:
        """Restart the AR engine when its process dies (vLLM's monitor marks it errored)."""
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
                self.llm = await asyncio.to_thread(_new_ar_engine, self.model, self._ar_args)
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
        await asyncio.to_thread(self.loop.stop)
        llm, self.llm = self.llm, None
        if llm is not None and self._owns_llm:
            llm.shutdown()
            # Collect it now: AsyncLLM.__del__ run at interpreter exit, after
            # module teardown, fails noisily.
            del llm
            gc.collect()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{int(time.time() * 1000)}"

    # ---- AR only -------------------------------------------------------------------
    async def generate_text(self, prompt: Any, sampling_params: Any = None, request_id: str | None = None):
        """text2text / img2text: the AR stage's final RequestOutput (vLLM's type)."""
        from vllm import SamplingParams as VllmSamplingParams

        params = sampling_params or VllmSamplingParams(**self.ar_defaults)
        return await self._run_ar(prompt, params, request_id or self.new_id("bagel-text"))

    # ---- AR -> DiT ------------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> ResolvedParams:
        return self.pipeline.resolve(params, self.engine.stage_defaults)

    async def _prefill(self, request_id: str, text: str, timings: StageTimings) -> BranchKV:
        """A text-only context: [<|im_start|>] text [<|im_end|>]."""
        ids = text_block_ids(self.pipeline.model, text)
        return await self._transfer(request_id, {"prompt_token_ids": ids}, len(ids), 0, timings)

    async def _transfer(self, request_id: str, prompt: dict[str, Any], num_tokens: int, vae_tokens: int,
                        timings: StageTimings) -> BranchKV:
        """Prefill `prompt` on the AR stage and take its transferred KV (checked: length, VAE block)."""
        from vllm import SamplingParams as VllmSamplingParams

        # One token is the least the engine generates; only the prompt's KV is used.
        params = VllmSamplingParams(max_tokens=1, temperature=0.0,
                                    extra_args={"kv_transfer_params": request_params()})
        final = await self._run_ar(prompt, params, request_id)
        started = time.perf_counter()
        transferred = take_transferred(final.kv_transfer_params)
        # Hand-over = the producer's gather + store (inside the AR step) + this read.
        timings.transfer += time.perf_counter() - started + transferred.metadata.get("save_seconds", 0.0)
        timings.transferred_bytes += sum(t.numel() * t.element_size() for t in (*transferred.keys, *transferred.values))
        if transferred.num_tokens != num_tokens:
            raise RuntimeError(f"{request_id}: transferred {transferred.num_tokens} tokens, prompt has {num_tokens}")
        got = transferred.metadata.get("vae_latent_tokens") or []
        if got != ([vae_tokens] if vae_tokens else []):
            raise RuntimeError(f"{request_id}: the AR stage's VAE blocks hold {got} latent tokens, expected {vae_tokens}")
        return BranchKV(transferred.keys, transferred.values, transferred.metadata["latent_position"])

    def _img2img_prefills(self, rid: str, resolved: ResolvedParams, timings: StageTimings) -> list:
        """cond / cfg_text / cfg_img of an img2img request, as AR prefills (coroutines)."""
        from PIL import Image

        from ..models.bagel_processing import VAE_IMAGE

        if not self.llm.vllm_config.model_config.multimodal_config.get_limit_per_prompt(VAE_IMAGE):
            raise ValueError(f"img2img needs the AR stage to take {VAE_IMAGE} inputs: set its engine_args "
                             f"limit_mm_per_prompt to include {{{VAE_IMAGE}: 1}} (stage config {self.config.name!r})")
        m, c = self.pipeline.model, self.pipeline.model.config
        height, width = resolved.height, resolved.width
        edit = resolved.images[0].convert("RGB")
        side = c.vit_image_size
        # The VAE sees the edit image at the output size; the ViT at its square input (the processor's
        # own resize is then a no-op): both as encode_context resizes them.
        images = {
            VAE_IMAGE: edit if edit.size == (width, height) else edit.resize((width, height), Image.BICUBIC),
            "image": edit if edit.size == (side, side) else edit.resize((side, side), Image.BICUBIC),
        }
        vae_tokens = (height // c.latent_downsample) * (width // c.latent_downsample)
        blocks = vae_tokens + 2 + (side // c.vit_patch) ** 2 + 2
        images_prefix = f"{SOI}<|vision_pad|>{EOI}{SOI}<|image_pad|>{EOI}"

        def with_images(branch: str, text: str | None):
            prompt = images_prefix + ("" if text is None else f"{BOS}{text}{EOS}")
            n = blocks + (0 if text is None else len(text_block_ids(m, text)))
            return self._transfer(f"{rid}:{branch}", {"prompt": prompt, "multi_modal_data": images}, n, vae_tokens, timings)

        return [with_images("cond", resolved.prompt), with_images("cfg_text", resolved.negative_prompt),
                self._prefill(f"{rid}:cfg_img", resolved.prompt, timings)]

    async def generate_image(self, params: SamplingParams | ResolvedParams, on_progress: ProgressFn | None = None,
                             request_id: str | None = None, timings: StageTimings | None = None) -> DiffusionOutput:
        timings = timings if timings is not None else StageTimings()
        started = time.perf_counter()
        resolved = params if isinstance(params, ResolvedParams) else self.resolve(params)
        rid = request_id or self.new_id("bagel-image")
        prefill_started = time.perf_counter()
        if resolved.images:
            cond, cfg_text, cfg_img = await asyncio.gather(*self._img2img_prefills(rid, resolved, timings))
        else:
            branches = [self._prefill(f"{rid}:cond", resolved.prompt, timings)]
            if resolved.negative_prompt is not None:
                branches.append(self._prefill(f"{rid}:cfg_text", resolved.negative_prompt, timings))
            kvs = await asyncio.gather(*branches)
            cond, cfg_text, cfg_img = kvs[0], kvs[1] if len(kvs) > 1 else empty_branch(self.pipeline.model), None
        timings.ar_prefill = time.perf_counter() - prefill_started - timings.transfer
        self.pipeline.contexts.put(BagelContext(rid, cond, cfg_text, cfg_img, resolved.height, resolved.width))
        try:
            diffusion_started = time.perf_counter()
            handle = self.loop.submit(resolved, on_progress, request_id=rid)
            try:
                output = await self.loop.result(handle)
            except asyncio.CancelledError:
                self.loop.abort(rid)  # the caller went away: free the DiT work at the next step
                raise
            timings.diffusion = time.perf_counter() - diffusion_started
            timings.decode = output.timings.get("decode", 0.0)
        finally:
            self.pipeline.contexts.discard(rid)  # no-op once the stage took it
        timings.total = time.perf_counter() - started
        logger.info("omni request %s: %s", rid, timings.summary())
        return output
