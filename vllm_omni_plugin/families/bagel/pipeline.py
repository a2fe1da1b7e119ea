"""BAGEL (BAGEL-7B-MoT) image generation as a step-wise diffusion stage.

Input per request: a `BagelContext` (the prefilled KV cache of each CFG branch,
keyed by request id), the stage's typed input, submitted with the request
(`engine.add_request(request_id, params, context)`): built by the AR hand-over
(families/bagel/orchestrator.py). Behind the AR stage (`stage_input_required`)
a request without one is an error naming the stage and the request; a
standalone DiT (loaded with `stage_input_required=False`: benchmarks, tests,
no vLLM) prefills it itself with `encode_context` from the prompt / input image.

Sampling follows ByteDance-Seed/Bagel (`generate_image` / `_forward_flow`):
  * noise: randn (latent tokens, p*p*z) from the request's generator, drawn in
    BAGEL's patchified layout;
  * flow times t = shift(linspace(1, 0, num_inference_steps)) with
    shift(t) = s*t / (1 + (s-1)*t), s = timestep_shift; the final t = 0 is
    dropped, so num_inference_steps=N runs N-1 model evaluations (BAGEL's
    `num_timesteps` semantics: the default 50 reproduces its default);
  * per step the query [<|vision_start|>, latents, <|vision_end|>] shares one
    RoPE position (the branch's latent_position); latents go through the
    generation expert (vae2llm + time embedding of t + latent_pos_embed), the
    markers through the understanding expert, all attending bidirectionally to
    each other and to the branch's context; llm2vae gives the velocity;
  * CFG inside cfg_interval (lo < t <= hi): v_text = v_cfg_text +
    cfg_text_scale*(v_cond - v_cfg_text); img2img then v = v_cfg_img +
    cfg_img_scale*(v_text - v_cfg_img); renorm ("global": whole-image norm,
    "channel": per token, "text_channel": per token, applied to the text
    guidance before the image guidance) rescales to at most the cond norm,
    at least cfg_renorm_min of it. Outside the interval (or scale <= 1) the
    companion forwards are skipped, as BAGEL does;
  * Euler: x <- x - v * (t_i - t_{i+1});
  * partial images (streaming): x0 = x_t - t_i * v, the Euler step taken all
    the way to t = 0 (with t_{i+1} = 0 it IS the step: the last step's x0 is the
    final latent exactly), decoded as the final latent is;
  * decode: FLUX AE, then BAGEL's uint8 conversion (clamp, truncate).

Text2img has ONE companion (cfg_text); `cfg_img_scale` does not apply and
resolves to None. (ByteDance's inferencer, called with cfg_img_scale > 1 on
text only, would use the conditional context as the "image-free" one; its
README's text2img settings use cfg_img_scale=1.0, which is what we do.)

Batching: rows of any number of requests and CFG branches with the same image
size share one forward; contexts of different lengths are right-padded and
masked, attended row by row, or packed for a variable-length kernel
(`attention_mode`; dit/attention.py, docs/bagel.md "The DiT step"). `batch_cfg=False` (dit_options
`cfg_batch: false`) runs one forward per CFG branch instead (the requests of a
branch still share it). The step itself keeps the host out of the loop: flow
times live as Python floats and on the device, the marker embeddings and the
padded context of a batch are built once, so nothing in a step reads a device
value back (`.item()`, `nonzero`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .dit.autoencoder import FluxAutoEncoder, to_uint8
from .dit.attention import pack_context, varlen_kernel
from .dit.context import BagelContext, BagelContextShard, BranchKV
from .dit.encode import check_size, default_size, encode_context
from .dit.mot import MoTDecoder, Route
from .dit.weights import BagelModel, load_bagel_model
from ...diffusion.capabilities import Capabilities, InvalidParams, Knob
from ...diffusion.handover import StageInputError
from ...diffusion.interface import StepwisePipeline
from ...diffusion.output import DiffusionOutput
from ...diffusion.params import PipelineDefaults, ResolvedParams
from ...diffusion.state import CfgLayout, DiffusionState

# BAGEL's own defaults (ByteDance's InterleaveInferencer.gen_image). Until
# SamplingParams has fields for them they travel in `extra` under these names.
BAGEL_DEFAULTS: Mapping[str, Any] = {
    "num_inference_steps": 50,
    "timestep_shift": 3.0,
    "cfg_text_scale": 4.0,
    "cfg_img_scale": 1.5,
    "cfg_interval": (0.4, 1.0),
    "cfg_renorm_type": "global",
    "cfg_renorm_min": 0.0,
}
RENORM_TYPES = ("global", "channel", "text_channel")
#: attention_mode "auto": padding may add this fraction to the keys a batch attends to before the
#: rows attend one by one instead (measured on CPU: docs/bagel.md, "The DiT step")
PADDING_WASTE = 0.25
MAX_LAYOUTS = 3  # batch layouts kept (BagelStepwise._batch_layout)
#: CFG-parallel (dit_options cfg_degree): the "cfg" rank each branch runs on, per degree. Over two
#: ranks the companions share rank 1: cond's context is as long as cfg_text's and cfg_img's together
#: (img2img: image + text vs image, text), so both ranks receive about the same KV bytes.
BRANCH_RANKS: Mapping[int, Mapping[str, int]] = {
    1: {"cond": 0, "cfg_text": 0, "cfg_img": 0},
    2: {"cond": 0, "cfg_text": 1, "cfg_img": 1},
    3: {"cond": 0, "cfg_text": 1, "cfg_img": 2},
}


@dataclass(frozen=True)
class BagelCfg(CfgLayout):
    """BAGEL's CFG: up to three branches (cond, cfg_text, cfg_img), scales active inside `interval`."""

    kind: str = "bagel"
    text_scale: float = 1.0
    img_scale: float | None = None  # None: text2img, no image companion
    interval: tuple[float, float] = (0.0, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0

    @property
    def branches(self) -> int:
        # The most forwards one step can need (for the engine's token budget).
        return len(self.branch_names)

    @property
    def branch_names(self) -> list[str]:
        """The branches some step of the request runs."""
        if not self.text_scale > 1:
            return ["cond"]
        return ["cond", "cfg_text"] + (["cfg_img"] if self.img_scale is not None and self.img_scale > 1 else [])

    def scales_at(self, t: float) -> tuple[float, float]:
        """(text, image) scales at flow time t; (1, 1) outside the interval."""
        lo, hi = self.interval
        if lo < t <= hi:
            return self.text_scale, 1.0 if self.img_scale is None else self.img_scale
        return 1.0, 1.0


class _Components:
    """What the StepwisePipeline base expects of `pipe`: here just the BAGEL model."""

    def __init__(self, model: BagelModel) -> None:
        self.model = model
        self._execution_device = model.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the loaded weights (the EMA state dict's)."""
        return next(iter(self.model.w.values())).dtype


class BagelStepwise(StepwisePipeline):
    family = "bagel"
    capabilities = Capabilities(
        output="image",
        input_images=(0, 1),  # text2img, or img2img with one image
        fields=frozenset({"negative_prompt", "height", "width", "num_inference_steps"}),
        knobs={
            "timestep_shift": Knob(float, description="Shift of the flow-matching timestep schedule."),
            "cfg_text_scale": Knob(float, description="Text classifier-free guidance weight."),
            "cfg_img_scale": Knob(float, description="Image classifier-free guidance weight (img2img)."),
            "cfg_interval": Knob(tuple, length=2,
                                 description="[low, high]: the part of the schedule (0-1) where CFG runs."),
            "cfg_renorm_type": Knob(str, description="How the guided prediction is renormalised: "
                                    + ", ".join(RENORM_TYPES) + "."),
            "cfg_renorm_min": Knob(float, description="Lower bound of the CFG renormalisation factor."),
        },
        text_output=True,  # the AR stage answers text2text / img2text
        orchestrator="bagel",
        partial_images=True,  # x0 = x_t - t v (x0_estimate), decoded by its FLUX AE (decode_partial)
    )

    stage_input_type = BagelContext
    prediction_dtype = torch.float32  # the velocities (latent_out(...).float()) the CFG ranks gather

    def __init__(self, model: BagelModel, model_id: str = "", batch_cfg: bool = True,
                 stage_input_required: bool = False) -> None:
        # No diffusers scheduler to copy: each state carries its own flow-time table.
        super(StepwisePipeline, self).__init__(_Components(model), model_id or str(model.path))
        #: True: every CFG branch of every state in one forward; False: one forward per branch
        self.batch_cfg = batch_cfg
        self.model = model
        self.decoder = MoTDecoder(model)
        self.vae = FluxAutoEncoder(model)
        with torch.no_grad():  # [<|vision_start|>, <|vision_end|>] embeddings, the same in every step
            self._markers = model.embed_tokens(torch.tensor([model.token_id("<|vision_start|>"),
                                                             model.token_id("<|vision_end|>")], device=model.device))
        #: the laid-out contexts of the last batch layouts (reused while the batch stays the same;
        #: one per forward of a step: up to three with batch_cfg=False)
        self._layouts: list[tuple[Any, tuple[Any, ...]]] = []
        #: how a batched forward attends to contexts of different lengths (ATTENTION_MODES, dit_options
        #: attention_mode): "padded" (right-padded + boolean mask, one SDPA), "per_row" (one SDPA per row
        #: over its own context), "varlen" (rows packed back to back, a variable-length kernel:
        #: dit/attention.py), or "auto" (`auto_attention_mode`)
        self.attention_mode = "auto"
        #: behind the AR stage every request brings its BagelContext; standalone, one is prefilled here
        self.stage_input_required = stage_input_required

    @property
    def device(self) -> torch.device:
        return self.model.device

    def apply_dit_options(self, options: Any) -> None:
        """The DiT options that apply to BAGEL (diffusion/acceleration.py `DitOptions`): `cfg_batch`,
        `compile`, `cfg_degree`, `attention_mode`.

        compile="regional": one torch.compile'd MoT decoder layer, shared by every layer.
        cfg_degree 2 or 3: CFG-parallel (BRANCH_RANKS; the ranks are workers.launch_engine's).
        """
        par = options.parallel
        if options.quantization is not None or par.sp_degree > 1:
            raise ValueError("BAGEL's DiT stage takes dit_options cfg_batch, compile, cfg_degree and attention_mode; "
                             "quantization and sequence parallelism (Ulysses, ring) are not implemented for it")
        if par.cfg_degree not in BRANCH_RANKS:
            raise ValueError(f"BAGEL's DiT has at most 3 CFG branches (cond, cfg_text, cfg_img): cfg_degree "
                             f"(--omni-cfg-parallel-size) must be 1, 2 or 3, got {par.cfg_degree}")
        self.batch_cfg = options.cfg_batch
        self.attention_mode = options.attention_mode
        if options.compile is not None:
            # Dynamic token counts from the start: the rows (CFG on / off, concurrent requests) and
            # the image size change between steps and requests without recompiling (MoTDecoder).
            self.decoder.compile_layers()

    # ---- parameters -------------------------------------------------------------
    def defaults(self) -> PipelineDefaults:
        return PipelineDefaults(values=dict(BAGEL_DEFAULTS), derive=self._derive)

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        interval = tuple(float(x) for x in v["cfg_interval"])
        if len(interval) != 2 or not interval[0] <= interval[1]:
            raise InvalidParams(f"cfg_interval must be (low, high) with low <= high, got {v['cfg_interval']!r}",
                                "cfg_interval")
        if v["cfg_renorm_type"] not in RENORM_TYPES:
            raise InvalidParams(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {v['cfg_renorm_type']!r}",
                                "cfg_renorm_type")
        if isinstance(v["num_inference_steps"], int) and v["num_inference_steps"] < 2:
            raise InvalidParams("BAGEL needs num_inference_steps >= 2 (N flow times give N-1 steps)", "num_inference_steps")
        images = v.get("images") or None
        if images is not None and len(images) != 1:
            raise InvalidParams(f"BAGEL img2img takes exactly one input image, got {len(images)}", "image")
        image = images[0] if images else None
        height, width = v.get("height"), v.get("width")
        if height is None or width is None:
            dh, dw = default_size(self.model.config, image)
            height, width = height or dh, width or dw
        check_size(self.model.config, height, width)
        out = {
            "cfg_interval": interval,
            "cfg_img_scale": None if image is None else float(v["cfg_img_scale"]),
            "height": height,
            "width": width,
        }
        if not float(v["cfg_text_scale"]) > 1:  # no text CFG: the negative prompt's context is never used
            out["negative_prompt"] = None
        degree = self.cfg_degree
        if degree > 1:
            names = BagelCfg(text_scale=float(v["cfg_text_scale"]), img_scale=out["cfg_img_scale"]).branch_names
            if len(names) < degree:
                what = "img2img" if image is not None else "text2img"
                raise InvalidParams(
                    f"this BAGEL DiT stage runs CFG-parallel over {degree} ranks (--omni-cfg-parallel-size "
                    f"{degree}), one CFG branch or more each; this {what} request has {len(names)} "
                    f"({', '.join(names)}): send a request with cfg_text_scale > 1"
                    + (" and cfg_img_scale > 1 with one input image" if degree == 3 else "")
                    + f", or serve with --omni-cfg-parallel-size {max(len(names), 1)}",
                    "cfg_text_scale" if len(names) == 1 else ("image" if image is None else "cfg_img_scale"))
        return out

    @property
    def cfg_degree(self) -> int:
        return 1 if self.parallel is None else self.parallel.config.cfg_degree

    def stage_input_shard(self, stage_input: Any, params: ResolvedParams, cfg_rank: int, cfg_degree: int) -> Any:
        """The context KV of the branches of this request that run on `cfg_rank` (BRANCH_RANKS)."""
        ranks = BRANCH_RANKS[cfg_degree]
        return stage_input.shard([n for n in self._cfg(params).branch_names if ranks[n] == cfg_rank])

    def _cfg(self, params: ResolvedParams) -> BagelCfg:
        x = params.extra
        return BagelCfg(
            text_scale=float(x["cfg_text_scale"]),
            img_scale=x.get("cfg_img_scale"),
            interval=tuple(x["cfg_interval"]),
            renorm_type=x["cfg_renorm_type"],
            renorm_min=float(x["cfg_renorm_min"]),
        )

    # ---- prepare --------------------------------------------------------------------
    def context_for(self, params: ResolvedParams, request_id: str,
                    ctx: BagelContext | BagelContextShard | None) -> BagelContext | BagelContextShard:
        """The request's handed-over context (its branches read from the transfer store where the
        hand-over left them there: `BagelContext.loaded`; a CFG-parallel rank's shard arrives read),
        or (standalone only) one prefilled here."""
        if ctx is None:
            if self.stage_input_required:  # the engine refuses this at add_request; a direct call too
                raise StageInputError(f"request {request_id}: the bagel diffusion stage needs a BagelContext "
                                      "from the AR stage; none was handed over")
            image = params.images[0] if params.images else None
            return encode_context(self.model, request_id, params.prompt, image, params.negative_prompt,
                                  params.height, params.width)
        if (ctx.height, ctx.width) != (params.height, params.width):
            raise ValueError(f"request {request_id}: context is for {ctx.height}x{ctx.width}, "
                             f"the request resolved to {params.height}x{params.width}")
        return ctx.loaded()

    def prepare(self, params: ResolvedParams, request_id: str,
                stage_input: BagelContext | BagelContextShard | None = None) -> DiffusionState:
        """stage_input: the request's context; on a CFG-parallel rank its shard (stage_input_shard)."""
        with torch.no_grad():
            started = time.perf_counter()
            ctx = self.context_for(params, request_id, stage_input)
            context_seconds = time.perf_counter() - started
            cfg = self._cfg(params)
            if ctx.is_img2img != (cfg.img_scale is not None):
                raise ValueError(f"request {request_id}: the context is {'img2img' if ctx.is_img2img else 'text2img'} "
                                 f"but the request has {'an' if params.images else 'no'} input image")
            if self.parallel is not None and isinstance(ctx, BagelContext):  # prefilled here: keep this rank's
                ctx = self.stage_input_shard(ctx, params, self.parallel.cfg_rank, self.cfg_degree)
            m, c = self.model, self.model.config
            branches = {k: b.to(self.device, m.dtype) for k, b in ctx.branches().items()}
            generator = params.generator()
            n_tok = (params.height // c.latent_downsample) * (params.width // c.latent_downsample)
            # BAGEL draws float32 noise in its patchified token layout; latents stay float32 between steps.
            noise = torch.randn(params.num_outputs_per_prompt, n_tok, c.latent_patch**2 * c.z_channels, generator=generator)
            s = float(params.extra["timestep_shift"])
            t = torch.linspace(1, 0, params.num_inference_steps)
            sigmas = s * t / (1 + (s - 1) * t)
            return DiffusionState(
                request_id=request_id,
                params=params,
                latents=noise.to(self.device),
                scheduler=None,
                timesteps=sigmas[:-1],
                cfg=cfg,
                generator=generator,
                extras={"branches": branches, "sigmas": sigmas.tolist(), "sigmas_dev": sigmas.to(self.device),
                        "pos_ids": m.latent_position_ids(params.height, params.width),
                        "context_seconds": context_seconds},
                # from every branch's length, not this rank's: all CFG ranks batch alike
                tokens_per_row=n_tok + 2 + max(ctx.token_counts().values()),
            )

    # ---- denoise --------------------------------------------------------------------
    def batch_key(self, state: DiffusionState) -> Any:
        return (self.model_id, state.params.height, state.params.width)

    @staticmethod
    def _t(state: DiffusionState) -> float:
        """The state's current flow time, host-side (no device read)."""
        return state.extras["sigmas"][state.step_index]

    def _needed(self, state: DiffusionState) -> list[str]:
        text, img = state.cfg.scales_at(self._t(state))
        if text <= 1:
            return ["cond"]
        return ["cond", "cfg_text"] + (["cfg_img"] if img > 1 else [])

    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        with torch.no_grad():
            blocks = [(s, name) for s in states for name in self._needed(s)]
            degree = self.cfg_degree
            if degree == 1:
                by_block = dict(zip([(id(s), n) for s, n in blocks], self._run_blocks(blocks)))
            else:  # CFG-parallel: this rank runs its branches' blocks, the velocities are all-gathered
                ranks = BRANCH_RANKS[degree]
                owned = [[b for b in blocks if ranks[b[1]] == r] for r in range(degree)]
                mine = owned[self.parallel.cfg_rank]
                gathered = self.parallel.gather_blocks(self._run_blocks(mine), [len(o) for o in owned])
                by_block = {(id(s), n): v for rank_blocks, vs in zip(owned, gathered)
                            for (s, n), v in zip(rank_blocks, vs)}
            return [self._combine(s, {n: by_block[(id(s), n)] for n in self._needed(s)}) for s in states]

    def _run_blocks(self, blocks: list[tuple[DiffusionState, str]]) -> list[torch.Tensor]:
        """Velocities of (state, branch) blocks, in block order: one forward, or one per branch."""
        if not blocks:
            return []
        if self.batch_cfg:
            return self._forward(blocks)
        names = list(dict.fromkeys(n for _, n in blocks))
        per = {n: iter(self._forward([b for b in blocks if b[1] == n])) for n in names}
        return [next(per[n]) for _, n in blocks]

    def _forward(self, blocks: list[tuple[DiffusionState, str]]) -> list[torch.Tensor]:
        """One MoT forward over every row of every (state, branch) block; velocities per block."""
        m = self.model
        latents = torch.cat([s.latents for s, _ in blocks])
        t = torch.cat([s.extras["sigmas_dev"][s.step_index].expand(s.rows) for s, _ in blocks])
        n_lat = latents.shape[1]
        x = m.latent_embed(latents, t, blocks[0][0].extras["pos_ids"])
        r = len(x)
        markers = self._markers
        x = torch.cat([markers[:1].expand(r, 1, -1), x, markers[1:].expand(r, 1, -1)], dim=1)
        route, positions, past, mask = self._batch_layout(blocks, n_lat)
        hidden, _ = self.decoder.forward(x, route, positions, past, mask)
        v = m.latent_out(hidden[:, 1:-1]).float()
        return list(v.split([s.rows for s, _ in blocks]))

    def _batch_layout(self, blocks: list[tuple[DiffusionState, str]], n_lat: int) -> tuple[Any, ...]:
        """(route, RoPE positions, per-layer context KV (padded or per row), mask) of these blocks' rows.

        Built on the host once per batch layout (which requests, which branches) and reused by the
        following steps while it stays the same: restacking every layer's context KV each step would
        copy all of it again."""
        # the states themselves: by identity; the mode too (a layout is padded, per row or packed)
        key = (n_lat, self.attention_mode, [(s, name, s.rows) for s, name in blocks])
        for known, layout in self._layouts:
            if _same_layout(known, key):
                return layout
        del self._layouts[MAX_LAYOUTS - 1:]  # the oldest layout's copy is freed before this one is built
        rows = [s.extras["branches"][name] for s, name in blocks for _ in range(s.rows)]
        positions = torch.tensor([b.latent_position for b in rows], device=self.device)[:, None].expand(len(rows), n_lat + 2)
        layers, mode = self.model.config.layers, self._attention_mode(rows, n_lat + 2)
        if mode == "per_row":  # each row's own KV: nothing copied
            past, mask = [[(b.keys[i], b.values[i]) for b in rows] for i in range(layers)], None
        elif mode == "varlen":  # packed back to back once; each step writes only the image tokens' K/V
            past, mask = pack_context(rows, n_lat + 2, layers, varlen_kernel(self.device, self.model.dtype)), None
        else:
            past, mask = _stack_context(rows, n_lat + 2, layers)
        self._layouts.insert(0, (key, (Route.vae_block(), positions, past, mask)))
        return self._layouts[0][1]

    def _attention_mode(self, rows: list[BranchKV], n_query: int) -> str:
        if self.attention_mode != "auto":
            return self.attention_mode
        return auto_attention_mode([b.num_tokens for b in rows], n_query, torch.device(self.device).type)

    def _combine(self, state: DiffusionState, v: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = v["cond"]
        if "cfg_text" not in v:
            return cond
        cfg: BagelCfg = state.cfg
        text_scale, img_scale = cfg.scales_at(self._t(state))
        # text2img with an image scale would use the cond context as the image-free one
        image_free = v.get("cfg_img", cond)
        guided = v["cfg_text"] + text_scale * (cond - v["cfg_text"])
        if cfg.renorm_type == "text_channel":
            guided = guided * _renorm_scale(cond, guided, (-1,), cfg.renorm_min)
            return image_free + img_scale * (guided - image_free) if img_scale > 1 else guided
        if img_scale > 1:
            guided = image_free + img_scale * (guided - image_free)
        dims = (1, 2) if cfg.renorm_type == "global" else (-1,)  # global: the whole image of each row
        return guided * _renorm_scale(cond, guided, dims, cfg.renorm_min)

    def scheduler_step(self, states: list[DiffusionState], preds: list[torch.Tensor]) -> None:
        for s, v in zip(states, preds):
            sig = s.extras["sigmas"]  # Python floats: no device read
            s.latents = s.latents - v * (sig[s.step_index] - sig[s.step_index + 1])
            s.step_index += 1

    def x0_estimate(self, state: DiffusionState, pred: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - t * v: the Euler step of `scheduler_step` taken from t to 0.

        BAGEL's flow is x_t = (1 - t) x0 + t noise with v = noise - x0 (the update x - v dt
        moves towards t = 0), so x_t - t v = x0. At the last step t_{i+1} = 0, and this is
        the same float operation as the step itself: the last x0 equals the final latent.
        """
        return state.latents - pred * state.extras["sigmas"][state.step_index]

    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """An x0 estimate -> PIL images, as `decode` makes them. The FLUX AE is functional over
        the loaded weights (no state in modules), so the decode thread shares it with the loop."""
        return _to_pil(self._decode_pixels(latents, params))

    def _decode_pixels(self, latents: torch.Tensor, p: ResolvedParams) -> Any:
        z = self.model.unpatchify(latents, p.height, p.width)
        return to_uint8(self.vae.decode(z)).cpu().numpy()

    # ---- decode ---------------------------------------------------------------------
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        # a finished request's context is not kept alive by the layout cache
        self._layouts = [(k, v) for k, v in self._layouts if not any(s is state for s, _, _ in k[2])]
        p = state.params
        if p.output_type == "latent":
            out = DiffusionOutput(state.request_id, "latent", p, latents=state.latents)
        else:
            with torch.no_grad():
                pixels = self._decode_pixels(state.latents, p)
            images = list(pixels) if p.output_type == "np" else _to_pil(pixels)
            out = DiffusionOutput(state.request_id, "image", p, images=images)
        # reading the handed-over context (the KV hand-over's consumer side, in the DiT's process)
        out.timings["context_load"] = state.extras.get("context_seconds", 0.0)
        return out


def auto_attention_mode(lengths: list[int], n_query: int, device_type: str) -> str:
    """attention_mode "auto" for rows with these context lengths (docs/bagel.md, "The DiT step").

    CPU: padded (one masked SDPA) unless padding adds more than PADDING_WASTE to the attended keys,
    then per_row: torch has no CPU varlen kernel, so varlen there is the same SDPA per row over
    packed buffers, measured no faster (0.9-1.0x of per_row) and holding a packed copy of every
    context. CUDA: padded only when no mask is needed (equal lengths: one flash SDPA), else varlen
    (torch's flash varlen_attn over the packed rows, one call per layer): SDPA with a mask leaves the
    flash kernel (on an H200 the masked batched text2img step at 1024^2 ran at 0.88x of one forward
    per branch, docs/benchmarks.md, 2026-12-02), and per_row is a launch per row and layer.
    """
    if device_type == "cuda":
        return "padded" if len(set(lengths)) == 1 else "varlen"
    padded, exact = len(lengths) * (max(lengths) + n_query), sum(lengths) + len(lengths) * n_query
    return "per_row" if padded > (1 + PADDING_WASTE) * exact else "padded"


def _to_pil(pixels: Any) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in pixels]


def _same_layout(a: tuple[int, str, list], b: tuple[int, str, list]) -> bool:
    return a[:2] == b[:2] and len(a[2]) == len(b[2]) and all(
        x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a[2], b[2]))


def _renorm_scale(cond: torch.Tensor, guided: torch.Tensor, dims: tuple[int, ...], minimum: float) -> torch.Tensor:
    ratio = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) / (torch.linalg.vector_norm(guided, dim=dims, keepdim=True) + 1e-8)
    return ratio.clamp(min=minimum, max=1.0)


def _stack_context(branches: list[BranchKV], n_query: int, layers: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Per-layer (K, V) of every row, right-padded to the longest context, and the mask hiding the padding."""
    lengths = [b.num_tokens for b in branches]
    longest = max(lengths)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) if t.shape[0] < longest else t

    past = [(torch.stack([pad(b.keys[i]) for b in branches]), torch.stack([pad(b.values[i]) for b in branches]))
            for i in range(layers)]
    if all(n == longest for n in lengths):
        return past, None
    device = branches[0].keys[0].device
    mask = torch.ones(len(branches), 1, n_query, longest + n_query, dtype=torch.bool, device=device)
    for row, n in enumerate(lengths):
        mask[row, :, :, n:longest] = False
    return past, mask


def load_bagel_pipeline(path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None,
                        stage_input_required: bool = False) -> BagelStepwise:
    """Load a BAGEL directory (config.json + ema/ae safetensors, no model_index.json) as the stage.

    Args:
        path: the checkpoint directory.
        dtype, device: where the weights live (loader.default_load_config's defaults).
        stage_input_required: True behind the AR stage: every request brings its BagelContext
            and only the weights the DiT forward reads are loaded (`dit_forward_weight`);
            False: a standalone DiT that prefills contexts itself (all weights).
    """
    from ...diffusion.loader import default_load_config

    cfg = default_load_config(dtype, device)
    # Behind the AR stage the DiT loads only what its forward reads (each weight once: the AR
    # stage holds the LM head, the ViT, the encoder side); standalone it prefills its own contexts.
    model = load_bagel_model(path, cfg.dtype, cfg.device, dit_only=stage_input_required)
    return BagelStepwise(model, model_id=str(path), stage_input_required=stage_input_required)


__all__ = ["BAGEL_DEFAULTS", "BagelCfg", "BagelStepwise", "load_bagel_pipeline"]
