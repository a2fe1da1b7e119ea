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
(a 503 naming the stage), `ar_status` says so, and a supervisor task shuts the
dead engine down and starts a new one from the same engine args (off the event
loop, so the server keeps answering); requests during the restart get the same
503, later ones run. After `max_ar_restarts` deaths the stage stays down.
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
from .engine_loop import EngineLoop, ProgressFn, StageUnavailable
from .stage_config import StageConfig

logger = logging.getLogger("vllm.omni_plugin.orchestrator")


@dataclass
class StageTimings:
    """Where one image request's wall time went (seconds); for the overhead benchmark."""

    ar_prefill: float = 0.0
    transfer: float = 0.0
    diffusion: float = 0.0
    total: float = 0.0
    transferred_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class BagelOrchestrator:
    """Create inside a running event loop (`await BagelOrchestrator.create(...)`)."""

    def __init__(self, model: str, config: StageConfig, ar_engine_args: dict[str, Any] | None = None,
                 dtype: Any = None, device: Any = None, max_queue: int = 64) -> None:
        self.model = model
        self.config = config
        ar, dit = config.stage("ar"), config.stage("dit")
        self._transfer_dir = tempfile.mkdtemp(prefix="vllm-omni-kv-")
        args = {**ar.engine_args, **(ar_engine_args or {})}
        kv = dict(args.get("kv_transfer_config") or {})
        kv.setdefault("kv_connector_extra_config", {})
        kv["kv_connector_extra_config"] = {**kv["kv_connector_extra_config"], "transfer_dir": self._transfer_dir}
        args["kv_transfer_config"] = kv
        self._ar_args = args
        self.ar_defaults = dict(ar.default_sampling_params)
        self.pipeline = load_bagel_pipeline(model, dtype=dtype, device=device)
        self.engine = DiffusionEngine(self.pipeline, stage_defaults=dit.default_sampling_params or None)
        self.loop = EngineLoop(self.engine, max_queue)
        self.llm = None
        self._ids = itertools.count()
        self.ar_status = "starting"  # starting | running | restarting | failed
        self.ar_restarts = 0
        self.max_ar_restarts = 3
        self._supervisor: asyncio.Task | None = None

    @classmethod
    async def create(cls, *args, **kwargs) -> "BagelOrchestrator":
        self = cls(*args, **kwargs)
        self.llm = self._new_ar_engine()
        self.ar_status = "running"
        self.loop.start()
        self._supervisor = asyncio.create_task(self._supervise_ar())
        return self

    def _new_ar_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model, **self._ar_args))

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
                self.llm = await asyncio.to_thread(self._new_ar_engine)
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
            raise StageUnavailable(f"the AR stage's engine (vLLM EngineCore) died while running request "
                                   f"{request_id}; the server is restarting it, retry shortly") from e
        return final

    async def shutdown(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
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
        timings.transfer += time.perf_counter() - started
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

        limits = self._ar_args.get("limit_mm_per_prompt") or {}
        if not limits.get(VAE_IMAGE):
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
        finally:
            self.pipeline.contexts.discard(rid)  # no-op once the stage took it
        timings.total = time.perf_counter() - started
        return output
