"""The step-wise pipeline protocol, and `generate()` as the loop over its steps.

    state = pipe.prepare(params, request_id)          # encode, noise, timesteps
    while not state.done:
        preds = pipe.denoise_step([state, ...])        # model forward(s), CFG combined
        pipe.scheduler_step([state, ...], preds)       # x_t -> x_{t-1}, per state
    output = pipe.decode(state)                        # VAE decode, postprocess

`denoise_step` accepts states that share `batch_key(state)` and runs them in one
forward; the engine groups states by that key. `generate()` below is the only
loop: the engine runs the same three calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import uuid
from abc import ABC, abstractmethod
from typing import Any, Callable, Hashable, Mapping

import torch

from . import cuda_graphs
from .capabilities import Capabilities, InvalidParams, UnsupportedField
from .lora import LoraError, LoraPolicy, LoraSet, normalise_request
from .output import DiffusionOutput
from .parallel import ParallelGroup
from .params import PipelineDefaults, ResolvedParams, SamplingParams, resolve
from .state import BatchKey, DiffusionState

ProgressFn = Callable[[str, int, int], None]


class DiffusionPipelineBase(ABC):
    """Common ground of step-wise and monolithic pipelines around one diffusers pipeline."""

    #: True when the pipeline can only run a whole request at once (generic fallback).
    monolithic: bool = False
    #: name used in docs and logs
    family: str = "?"
    #: what this family makes, takes and reads (diffusion/capabilities.py); every
    #: concrete pipeline class declares it, an instance may refine it in __init__
    capabilities: Capabilities
    #: the typed input this stage takes from the stage before it, handed over with each
    #: request (diffusion/handover.py); None: it takes none
    stage_input_type: type | None = None
    #: every request must bring its stage input (a DiT stage behind an AR stage); False: the
    #: pipeline builds it itself when none is handed over (a standalone run, stated at load)
    stage_input_required: bool = False

    #: the LoRA adapters this pipeline serves (diffusion/lora.py; set by `enable_lora`), else None
    loras: LoraSet | None = None

    def __init__(self, pipe: Any, model_id: str = "") -> None:
        self.pipe = pipe
        self.model_id = model_id or type(pipe).__name__
        self._device: torch.device | None = None

    @classmethod
    def variant_for(cls, pipe: Any) -> "type[DiffusionPipelineBase] | None":
        """The class that serves this loaded diffusers pipeline: `cls`, a sibling chosen by its
        config, or None for the generic fallback (the family registry names `cls` by class name)."""
        return cls

    @property
    def device(self) -> torch.device:
        """The pipeline's execution device, looked up once.

        diffusers' `_execution_device` walks every module of every component
        (~9 ms of Python on the full Qwen-Image: 2297 DiT + 735 text-encoder + 260
        VAE modules) and `prepare` needs the device 2-3 times per request. The
        wrapped pipeline is placed before it is wrapped and never moved after.
        """
        if self._device is None:
            self._device = self.pipe._execution_device
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the loaded weights are in: the denoiser's (`pipe.transformer`, a diffusers
        pipeline's DiT) where the pipeline has one, else `pipe.dtype`."""
        model = getattr(self.pipe, "transformer", None)
        if isinstance(model, torch.nn.Module):
            param = next((p for p in model.parameters() if p.is_floating_point()), None)
            if param is not None:
                return param.dtype
        return self.pipe.dtype

    @property
    def dtype_name(self) -> str:
        """`dtype` as its name ("float32", "bfloat16" ...): what outputs and responses report."""
        return str(self.dtype).removeprefix("torch.")

    @abstractmethod
    def defaults(self) -> PipelineDefaults:
        """This family's own defaults and derived-value rule (see params.resolve)."""

    #: the family runs step caching (`cache_threshold`, step_cache.py)
    supports_step_cache: bool = False

    def resolve(
        self, request: SamplingParams, stage_defaults: SamplingParams | Mapping[str, Any] | None = None
    ) -> ResolvedParams:
        """request > stage defaults > this family's defaults; a field the family does not
        read, or an input-image count it does not take, is refused (`UnsupportedField`);
        step caching only where the family supports it (`supports_step_cache`)."""
        check_request(self.capabilities, request, self.family)
        if request.lora is not None:
            request = dataclasses.replace(request, lora=normalise_request(request.lora))
            if request.lora and self.loras is None:
                raise LoraError("this model serves no LoRA adapters (the server's --omni-lora / --omni-lora-dirs "
                                "switch them on)", "lora")
            if request.lora:
                self.loras.check(request.lora)
        resolved = resolve(request, stage_defaults, self.defaults())
        if resolved.cache_threshold is not None and not self.supports_step_cache:
            raise InvalidParams(f"{self.family} does not support step caching; leave cache_threshold unset",
                                "cache_threshold")
        return resolved

    def generate(
        self,
        request: SamplingParams | ResolvedParams,
        stage_defaults: SamplingParams | Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> DiffusionOutput:
        """One request, start to end (no batching with others)."""
        params = request if isinstance(request, ResolvedParams) else self.resolve(request, stage_defaults)
        if not params.lora:
            return self.run_whole(params, f"gen-{uuid.uuid4().hex[:8]}", progress)
        if self.loras is None:
            raise LoraError("this model serves no LoRA adapters", "lora")
        self.loras.acquire(params.lora)  # resident (an evicted one reloads) while it runs
        try:
            return self.run_whole(params, f"gen-{uuid.uuid4().hex[:8]}", progress)
        finally:
            self.loras.release(params.lora)

    @abstractmethod
    def run_whole(self, params: ResolvedParams, request_id: str, progress: ProgressFn | None) -> DiffusionOutput:
        """Run one resolved request to its output."""

    def enable_lora(self, policy: LoraPolicy) -> LoraSet:
        """Serve per-request LoRA adapters (step-wise pipelines only: the rows of a forward carry them)."""
        if self.monolithic:
            raise ValueError(f"{self.family} runs whole requests; per-request LoRA needs a step-wise pipeline")
        if self.loras is None:
            self.loras = LoraSet(self.pipe, policy)
        return self.loras


def check_request(capabilities: Capabilities, request: SamplingParams, family: str = "this model") -> None:
    """Refuse what the declaration says the family does not read (raises `UnsupportedField`)."""
    capabilities.check_images(len(request.images or ()))
    if request.partial_images and not capabilities.partial_images:
        raise UnsupportedField(f"{family} cannot stream partial images (it declares no x0 decoder); "
                               "leave partial_images unset or 0", "partial_images")
    capabilities.check_fields(set(request.set_fields()) - {"images", "partial_images", "lora"})


def preview_latents(latents: torch.Tensor, downscale: int) -> torch.Tensor:
    """Spatial VAE latents [..., H, W] average-pooled by `downscale` per side (where it divides
    both), for a partial-image preview: the VAE decoder's cost grows with the pixels, so a factor
    of 2 decodes a quarter of them (measured on CPU: ~7x cheaper, docs/benchmarks.md)."""
    h, w = latents.shape[-2:]
    if downscale <= 1 or h % downscale or w % downscale:
        return latents
    lead = latents.shape[:-2]
    pooled = torch.nn.functional.avg_pool2d(latents.reshape(-1, 1, h, w), downscale)
    return pooled.reshape(*lead, h // downscale, w // downscale)


def resize_previews(images: list[Any], width: int, height: int) -> list[Any]:
    """PIL previews -> the request's size (bilinear), so a partial image has the `size` its event names."""
    from PIL import Image

    return [img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR) for img in images]


# DiffusionState.extras key: the "cfg"-dimension ranks a request's branches run on (cfg_split).
_RANKS_KEY = "parallel_ranks"


class StepwisePipeline(DiffusionPipelineBase):
    """prepare -> denoise_step xN -> scheduler_step xN -> decode, on explicit states."""

    monolithic = False
    #: partial images are previews decoded from latents pooled by this factor per side (then
    #: resized to the request's size), 1: at full resolution. A family that supports it sets its
    #: default; set it on an instance to change it (`preview_latents`, docs/server.md). The
    #: completed image never depends on it.
    partial_downscale: int = 1
    #: this rank's multi-GPU DiT group (parallel.py, set by workers.attach_parallel); None on one device
    parallel: ParallelGroup | None = None
    #: the dtype of a forward's outputs that CFG ranks all-gather; None: the DiT module's dtype
    prediction_dtype: torch.dtype | None = None

    def stage_input_shard(self, stage_input: Any, params: ResolvedParams, cfg_rank: int, cfg_degree: int) -> Any:
        """What of a request's stage input the rank at "cfg" coordinate `cfg_rank` needs (multi-rank DiT).

        Rank 0 sends each worker rank its shard (DiffusionEngine._send_stage_inputs). The default is
        the whole input; a pipeline whose CFG branches read different parts of it (BAGEL: one context
        KV per branch) returns only the parts of the branches that rank runs.
        """
        return stage_input

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id)
        # Pristine, taken before anything runs; requests deep-copy it, nobody steps it.
        self._scheduler_template = copy.deepcopy(pipe.scheduler)
        #: True: rows of all states and CFG branches share forwards (see group_blocks).
        #: False: one forward for all cond rows and one for all uncond rows, which
        #: for a single request is exactly diffusers' own sequence of forwards.
        self.batch_cfg = batch_cfg

    def new_scheduler(self) -> Any:
        """A private scheduler for one request: a deep copy, never the shared instance."""
        return copy.deepcopy(self._scheduler_template)

    @staticmethod
    def make_state(params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras, tokens):
        """The one place a DiffusionState is built (`tokens`: per row and CFG branch)."""
        return DiffusionState(
            request_id=request_id,
            params=params,
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            cfg=cfg,
            generator=generator,
            cond=cond,
            uncond=uncond,
            extras=extras,
            tokens_per_row=tokens,
        )

    @abstractmethod
    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        """Encode prompts and inputs, draw the noise, set the timesteps."""

    def prepare_many(
        self, params: list[ResolvedParams], request_ids: list[str], stage_inputs: list[Any] | None = None
    ) -> list[DiffusionState | Exception]:
        """Prepare requests admitted in one engine step, in order.

        A pipeline may share work between them (Qwen-Image: one text-encoder call
        for all their prompts). A request whose preparation fails gets its
        exception in its slot; the others go on.

        Args:
            params: each request's resolved parameters.
            request_ids: their ids.
            stage_inputs: pipelines that declare a `stage_input_type` only: each request's
                handed-over input (None where it brought none), passed to `prepare` as
                `stage_input`.
        """
        out: list[DiffusionState | Exception] = []
        for i, (p, rid) in enumerate(zip(params, request_ids)):
            try:
                if stage_inputs is None:
                    out.append(self.prepare(p, rid))
                else:
                    out.append(self.prepare(p, rid, stage_input=stage_inputs[i]))
            except Exception as exc:  # noqa: BLE001 -- reported as that request's error by the engine
                out.append(exc)
        return out

    @abstractmethod
    def batch_key(self, state: DiffusionState) -> BatchKey:
        """States with equal keys can share one forward at their current step."""

    @abstractmethod
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        """One model evaluation for every state (CFG combined); returns one prediction per state."""

    #: A forward with fewer tokens than this is overhead-bound: such row groups are
    #: merged (text padded + masked) into one forward. Bigger groups keep their own,
    #: unmasked forward (a mask moves attention off the fastest kernels).
    small_forward_tokens: int = 4096

    def text_layout(self, state: DiffusionState, branch: int) -> Hashable:
        """Rows with equal text layout share a forward without padding or mask."""
        return None

    def group_blocks(self, blocks: list[tuple[DiffusionState, int]]) -> list[list[tuple[DiffusionState, int]]]:
        """Split (state, branch) blocks into forwards (see `batch_cfg`, `small_forward_tokens`)."""
        # diffusers' ring attention takes no attention mask: under ring SP, rows
        # of different text layouts never share a (padded, masked) forward.
        masks_allowed = self.parallel is None or self.parallel.config.ring_degree == 1
        if not self.batch_cfg:
            by_branch = [g for g in ([x for x in blocks if x[1] == b] for b in (0, 1)) if g]
            return by_branch if masks_allowed else [g for br in by_branch for g in self._by_layout(br)]

        def tokens(group: list[tuple[DiffusionState, int]]) -> int:
            return sum(s.tokens_per_row * s.rows for s, _ in group)

        groups = sorted(self._by_layout(blocks), key=tokens)
        if not masks_allowed:
            return groups
        big = [g for g in groups if tokens(g) >= self.small_forward_tokens]
        small = [x for g in groups if tokens(g) < self.small_forward_tokens for x in g]
        if not small:
            return big
        if big and tokens(small) < self.small_forward_tokens:
            return [big[0] + small, *big[1:]]
        return [*big, small]

    def _by_layout(self, blocks: list[tuple[DiffusionState, int]]) -> list[list[tuple[DiffusionState, int]]]:
        by_layout: dict[Hashable, list[tuple[DiffusionState, int]]] = {}
        for s, b in blocks:
            by_layout.setdefault(self.text_layout(s, b), []).append((s, b))
        return list(by_layout.values())

    @staticmethod
    def cfg_split(
        states: list[DiffusionState], blocks: list[tuple[DiffusionState, int]], ranks: int
    ) -> list[list[tuple[DiffusionState, int]]]:
        """Batch split over the "cfg" mesh dimension: which (state, branch) blocks each rank runs, in block order.

        A request is placed at its first step and keeps its ranks to the end (its
        step cache lives there): a CFG request on the two least loaded ranks, cond
        on the lower-numbered one; a request without CFG on the least loaded rank
        (ties: lower rank). Load = tokens of the live requests placed there. CFG
        requests are placed before the others of the same step. With 2 ranks every
        cond runs on rank 0 and every uncond on rank 1: each rank runs exactly the
        forward the one-device engine runs with batch_cfg=False. With more ranks
        the requests are also dealt out (data parallelism).
        """
        if ranks == 1:
            return [blocks]
        def placed(s: DiffusionState) -> bool:
            return len(s.extras.get(_RANKS_KEY, ())) == s.cfg.branches

        load = [0] * ranks
        # stable sort: the placed requests load their ranks first, then new CFG ones, then the rest
        for s in sorted(states, key=lambda s: (not placed(s), s.cfg.branches == 1)):
            if not placed(s):
                least = sorted(range(ranks), key=lambda i: (load[i], i))[: s.cfg.branches]
                s.extras[_RANKS_KEY] = tuple(sorted(least))
            for r in s.extras[_RANKS_KEY]:
                load[r] += s.tokens_per_row * s.rows
        return [[(s, b) for s, b in blocks if s.extras[_RANKS_KEY][b] == r] for r in range(ranks)]

    def run_branches(
        self, states: list[DiffusionState], forward: Callable[[list[tuple[DiffusionState, int]]], torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """Run `forward` over (state, branch) blocks, grouped by `group_blocks`.

        `forward(blocks)` returns the model output of the blocks' rows stacked in
        order. Returns, per state, its outputs per branch (0 = cond, 1 = uncond).
        """
        blocks = [(s, b) for s in states for b in range(s.cfg.branches)]
        par = self.parallel
        cfg_ranks = 1 if par is None else par.config.cfg_degree
        owned = self.cfg_split(states, blocks, cfg_ranks)
        mine = owned[0 if par is None else par.cfg_rank]
        outs: dict[tuple[int, int], torch.Tensor] = {}
        for group in self.group_blocks(mine):
            if self.loras is None:
                result = forward(group)
            else:  # which rows use which adapters (a request's CFG rows use its adapters, as in diffusers);
                # CUDA graphs off while any row has one: the adapters' row plan is host data, per forward
                graphs = cuda_graphs.off("lora") if any(s.params.lora for s, _ in group) else contextlib.nullcontext()
                with graphs, self.loras.rows([(s.params.lora, s.rows) for s, _ in group]):
                    result = forward(group)
            for (s, b), chunk in zip(group, result.split([s.rows for s, _ in group])):
                outs[(id(s), b)] = chunk
        if cfg_ranks > 1:
            gathered = par.gather_blocks([outs[(id(s), b)] for s, b in mine], [len(o) for o in owned])
            for rank_blocks, tensors in zip(owned, gathered):
                outs.update(((id(s), b), t) for (s, b), t in zip(rank_blocks, tensors))
        return [[outs[(id(s), b)] for b in range(s.cfg.branches)] for s in states]

    def guided_predictions(
        self,
        states: list[DiffusionState],
        forward: Callable[[list[tuple[DiffusionState, int]]], torch.Tensor],
        latent_tokens: bool = True,
    ) -> list[torch.Tensor]:
        """Per state, its prediction from `run_branches(states, forward)`: the conditional output
        alone without an unconditional branch, else uncond + scale * (cond - uncond) at this step's
        scale, rescaled to the conditional output's norm (last dim) where `state.cfg.renorm`.

        latent_tokens: the outputs carry condition-image tokens after the latents' (dim 1):
        keep the first `latents.shape[1]`; False: the outputs are the prediction as they are.
        """
        preds = []
        for s, outs in zip(states, self.run_branches(states, forward)):
            if latent_tokens:
                outs = [o[:, :s.latents.shape[1]] for o in outs]
            cond = outs[0]
            if s.uncond is None:
                preds.append(cond)
                continue
            neg = outs[1]
            comb = neg + s.guidance_scale_now() * (cond - neg)
            if s.cfg.renorm:
                comb = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            preds.append(comb)
        return preds

    @torch.no_grad()
    def scheduler_step(self, states: list[DiffusionState], preds: list[torch.Tensor]) -> None:
        """Advance each state by one step with its own scheduler."""
        for state, pred in zip(states, preds):
            t = state.current_timestep
            state.latents = state.scheduler.step(pred, t, state.latents, return_dict=False)[0]
            state.step_index += 1

    @abstractmethod
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        """Latents -> images / frames (or the latents themselves for output_type="latent")."""

    def decode_many(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        """Decode several finished states (a pipeline may batch their VAE calls)."""
        return [self.decode(s) for s in states]

    # ---- partial images (families that declare `capabilities.partial_images`) --------------
    def x0_estimate(self, state: DiffusionState, pred: torch.Tensor) -> torch.Tensor:
        """The model's current estimate of the clean latent, from this step's prediction.

        Called by the engine BEFORE `scheduler_step` (the state still holds x_t). The
        default is flow matching's (FlowMatchEulerDiscreteScheduler, velocity prediction):
        x_t = (1 - sigma) x0 + sigma noise and v = noise - x0 give x0 = x_t - sigma v.
        Returns a new tensor (the state is not touched).
        """
        sigma = state.scheduler.sigmas[state.step_index].to(state.latents.device, torch.float32)
        return state.latents.to(torch.float32) - sigma * pred.to(torch.float32)

    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """Latents of `params`' layout (an `x0_estimate`) -> PIL images (one per row; a layered
        output: its layers, flattened as its completed images are), of the request's size.

        Runs on the engine's partial-decode thread, concurrently with the step loop:
        it must not touch shared state the loop uses (a VAE that caches features in
        its modules needs its own copy). A family may decode a cheaper preview
        (`partial_downscale`, `preview_latents`, `resize_previews`).
        """
        raise NotImplementedError(f"{self.family} declares no partial-image decoder")

    def run_whole(self, params: ResolvedParams, request_id: str, progress: ProgressFn | None) -> DiffusionOutput:
        state = self.prepare(params, request_id)
        with torch.no_grad():
            while not state.done:
                preds = self.denoise_step([state])
                self.scheduler_step([state], preds)
                if progress is not None:
                    progress(request_id, state.step_index, state.num_steps)
        return self.decode(state)
