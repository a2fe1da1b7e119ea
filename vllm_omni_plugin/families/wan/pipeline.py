"""Wan (2.1 / 2.2) text-to-video and image-to-video as step-wise pipelines.

Follows diffusers 0.42 `WanPipeline` / `WanImageToVideoPipeline.__call__`:
UMT5 prompt embeddings padded to `max_sequence_length`, float32 latents, the
multistep scheduler (UniPC) per request, and Wan2.2's two experts: `transformer`
for timesteps >= boundary_ratio * num_train_timesteps (high noise, scale
`guidance_scale`), `transformer_2` below it (low noise, scale `guidance_scale_2`).

Batching: rows share a forward when they use the same expert at their current
step and have the same latent shape and text length (always
`max_sequence_length`: Wan pads text to it, no mask needed).
"""

from __future__ import annotations

from typing import Any

import torch

from ...diffusion.capabilities import Capabilities, InvalidParams
from ...diffusion.interface import StepwisePipeline
from ...diffusion.output import DiffusionOutput
from ...diffusion.params import PipelineDefaults, ResolvedParams
from ...diffusion.state import CfgLayout, DiffusionState

# Model-card defaults of the Wan-AI checkpoints (diffusers' signature says 50
# steps / scale 5.0 for every Wan; the Wan2.2 A14B cards use 40 steps).
WAN21_DEFAULTS = dict(num_inference_steps=50, guidance_scale=5.0)
WAN22_T2V_DEFAULTS = dict(num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0)
WAN22_I2V_DEFAULTS = dict(num_inference_steps=40, guidance_scale=3.5, guidance_scale_2=3.5)
# What Wan reads (`guidance_scale_2` only with two experts: dropped per instance for Wan2.1).
WAN_FIELDS = frozenset({
    "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "guidance_scale_2",
    "num_frames", "fps", "max_sequence_length",
})
VIDEO_DEFAULTS = dict(height=480, width=832, num_frames=81, fps=16, max_sequence_length=512)


class WanStepwise(StepwisePipeline):
    """Text-to-video (WanPipeline)."""

    family = "wan-t2v"
    capabilities = Capabilities(output="video", fields=WAN_FIELDS)
    _wan22_defaults = WAN22_T2V_DEFAULTS

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        if self.boundary_ratio is None:  # Wan2.1: one expert, no second guidance scale
            self.capabilities = self.capabilities.without_fields("guidance_scale_2")

    @classmethod
    def variant_for(cls, pipe: Any) -> "type[StepwisePipeline] | None":
        # Wan2.2 TI2V-5B (`expand_timesteps`): per-token timesteps, text- and image-to-video in one
        # checkpoint (its model_index names WanPipeline); the I2V class with it stays generic.
        if getattr(pipe.config, "expand_timesteps", False):
            return WanTI2VStepwise if cls is WanStepwise else None
        return cls

    @property
    def boundary_ratio(self) -> float | None:
        return self.pipe.config.boundary_ratio

    @property
    def _transformer(self) -> Any:
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    # ---- parameters -------------------------------------------------------------
    def defaults(self) -> PipelineDefaults:
        model = self._wan22_defaults if self.boundary_ratio is not None else WAN21_DEFAULTS
        return PipelineDefaults(values={**VIDEO_DEFAULTS, **model}, derive=self._derive)

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.boundary_ratio is None:
            out["guidance_scale_2"] = None
        elif "guidance_scale_2" not in explicit and "guidance_scale" in explicit:
            # Derived from the *resolved* guidance_scale, as diffusers does for an unset value.
            out["guidance_scale_2"] = v["guidance_scale"]
        if not v["guidance_scale"] > 1.0:
            # diffusers runs CFG iff guidance_scale > 1: then neither the second scale nor the
            # negative prompt is used, and they are reported as not used.
            out.update(guidance_scale_2=None, negative_prompt=None)
        temporal = self.pipe.vae_scale_factor_temporal
        frames = v["num_frames"]
        if frames % temporal != 1:
            frames = frames // temporal * temporal + 1
        out["num_frames"] = max(frames, 1)
        patch = self._transformer.config.patch_size
        h_mult = self.pipe.vae_scale_factor_spatial * patch[1]
        w_mult = self.pipe.vae_scale_factor_spatial * patch[2]
        out["height"] = v["height"] // h_mult * h_mult
        out["width"] = v["width"] // w_mult * w_mult
        return out

    # ---- prepare ------------------------------------------------------------------
    def _cfg(self, params: ResolvedParams, timesteps: torch.Tensor) -> tuple[CfgLayout, tuple[bool, ...]]:
        boundary = None
        if self.boundary_ratio is not None:
            boundary = self.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
        high = tuple(boundary is None or bool(t >= boundary) for t in timesteps)
        if not params.guidance_scale > 1.0:  # diffusers: CFG is on iff guidance_scale > 1
            return CfgLayout("none"), high
        scales = tuple(float(params.guidance_scale if h else params.guidance_scale_2) for h in high)
        return CfgLayout("cfg", scales), high

    def _encode(self, params: ResolvedParams, do_cfg: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        pe, npe = self.pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            do_classifier_free_guidance=do_cfg,
            num_videos_per_prompt=params.num_outputs_per_prompt,
            max_sequence_length=params.max_sequence_length,
            device=self.device,
        )
        dtype = self._transformer.dtype
        cond = {"encoder_hidden_states": pe.to(dtype)}
        uncond = {"encoder_hidden_states": npe.to(dtype)} if do_cfg else None
        return cond, uncond

    def _schedule(self, params: ResolvedParams) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        return scheduler, scheduler.timesteps

    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        with torch.no_grad():
            return self._prepare(params, request_id)

    def _prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        do_cfg = params.guidance_scale > 1.0
        cond, uncond = self._encode(params, do_cfg)
        scheduler, timesteps = self._schedule(params)
        generator = params.generator()
        size = (params.height, params.width, params.num_frames)
        n, channels = params.num_outputs_per_prompt, self._transformer.config.in_channels
        latents = self.pipe.prepare_latents(n, channels, *size, torch.float32, self.device, generator)
        scheduler.set_begin_index(0)
        return self._state(params, request_id, latents, scheduler, timesteps, generator, cond, uncond, {})

    def _state(self, params, request_id, latents, scheduler, timesteps, generator, cond, uncond, extras):
        cfg, high = self._cfg(params, timesteps)
        patch = self._transformer.config.patch_size
        _, _, f, h, w = latents.shape
        image_tokens = (f // patch[0]) * (h // patch[1]) * (w // patch[2])
        tokens = image_tokens + cond["encoder_hidden_states"].shape[1]
        extras = {**extras, "high_noise": high}
        return self.make_state(
            params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras, tokens
        )

    # ---- denoise ------------------------------------------------------------------
    def _expert(self, state: DiffusionState) -> str:
        return "high" if state.extras["high_noise"][state.step_index] else "low"

    def batch_key(self, state: DiffusionState) -> Any:
        return (
            self.model_id,
            self._expert(state),
            tuple(state.latents.shape[1:]),
            tuple(state.cond["encoder_hidden_states"].shape[1:]),
            "encoder_hidden_states_image" in state.cond,
        )

    def _model_input(self, state: DiffusionState) -> torch.Tensor:
        return state.latents

    def _timestep(self, state: DiffusionState) -> torch.Tensor:
        """The transformer's timestep input for the state's rows: one value per row."""
        return state.current_timestep.expand(state.rows)

    @torch.no_grad()
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        return self.guided_predictions(states, self._forward, latent_tokens=False)

    def _forward(self, blocks: list[tuple[DiffusionState, int]]) -> torch.Tensor:
        """One call of the current expert over the rows of (state, branch) blocks."""
        model = self.pipe.transformer if self._expert(blocks[0][0]) == "high" else self.pipe.transformer_2
        dtype = self._transformer.dtype
        hidden, timesteps, texts, images = [], [], [], []
        for s, branch in blocks:
            inputs = s.cond if branch == 0 else s.uncond
            hidden.append(self._model_input(s).to(dtype))
            timesteps.append(self._timestep(s))
            texts.append(inputs["encoder_hidden_states"])
            if "encoder_hidden_states_image" in inputs:
                images.append(inputs["encoder_hidden_states_image"])
        return model(
            hidden_states=torch.cat(hidden),
            timestep=torch.cat(timesteps),
            encoder_hidden_states=torch.cat(texts),
            **({"encoder_hidden_states_image": torch.cat(images)} if images else {}),
            attention_kwargs=None,
            return_dict=False,
        )[0]

    # ---- decode -------------------------------------------------------------------
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        with torch.no_grad():
            return self._decode(state)

    def _final_latents(self, state: DiffusionState) -> torch.Tensor:
        return state.latents

    def _decode(self, state: DiffusionState) -> DiffusionOutput:
        p, vae = state.params, self.pipe.vae
        if p.output_type == "latent":
            return DiffusionOutput(state.request_id, "latent", p, latents=self._final_latents(state), fps=p.fps)
        latents = self._final_latents(state).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = self.pipe.video_processor.postprocess_video(video, output_type=p.output_type)
        return DiffusionOutput(state.request_id, "video", p, videos=[list(v) for v in frames], fps=p.fps)


class WanImageToVideoStepwise(WanStepwise):
    """Image-to-video (WanImageToVideoPipeline, first-frame conditioning)."""

    family = "wan-i2v"
    capabilities = Capabilities(output="video", input_images=(1, 1), fields=WAN_FIELDS)
    _wan22_defaults = WAN22_I2V_DEFAULTS

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        if not v.get("images"):
            raise InvalidParams("image-to-video needs an input image (`images`)", "input_reference")
        return super()._derive(v, explicit)

    def _prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        pipe, n = self.pipe, params.num_outputs_per_prompt
        image = params.images[0]
        do_cfg = params.guidance_scale > 1.0
        cond, uncond = self._encode(params, do_cfg)
        if self._transformer.config.image_dim is not None:  # Wan2.1 I2V: CLIP image tokens
            image_embeds = pipe.encode_image(image, self.device).repeat(n, 1, 1).to(self._transformer.dtype)
            cond["encoder_hidden_states_image"] = image_embeds
            if uncond is not None:
                uncond["encoder_hidden_states_image"] = image_embeds
        scheduler, timesteps = self._schedule(params)
        pixels = pipe.video_processor.preprocess(image, height=params.height, width=params.width)
        pixels = pixels.to(self.device, dtype=torch.float32)
        generator = params.generator()
        size = (params.height, params.width, params.num_frames)
        latents, condition = pipe.prepare_latents(
            pixels, n, pipe.vae.config.z_dim, *size, torch.float32, self.device, generator, None, None
        )
        return self._state(
            params, request_id, latents, scheduler, timesteps, generator, cond, uncond, {"condition": condition}
        )

    def batch_key(self, state: DiffusionState) -> Any:
        return (*super().batch_key(state), tuple(state.extras["condition"].shape[1:]))

    def _model_input(self, state: DiffusionState) -> torch.Tensor:
        return torch.cat([state.latents, state.extras["condition"]], dim=1)


# Wan2.2 TI2V-5B model card (wan/configs/wan_ti2v_5B.py): 50 steps, scale 5.0, 720P (1280x704), 121 frames at 24 fps.
TI2V_DEFAULTS = dict(num_inference_steps=50, guidance_scale=5.0, height=704, width=1280, num_frames=121, fps=24,
                     max_sequence_length=512)


class WanTI2VStepwise(WanStepwise):
    """Wan2.2 TI2V-5B: text-to-video, or image-to-video with the same weights (`expand_timesteps`).

    As diffusers' WanPipeline / WanImageToVideoPipeline with `expand_timesteps=True`: the
    transformer takes one timestep per latent token. Text-to-video: every token at t.
    With an image: its VAE latent is the first latent frame -- the model input is
    `(1 - mask) * condition + mask * latents` with mask 0 on frame 0, whose tokens run
    at t = 0 -- and the decoded latents get the same composition. The image path uses
    diffusers' own `WanImageToVideoPipeline.prepare_latents` on a pipeline object that
    shares this checkpoint's modules (nothing is copied). Requests with and without an
    image share forwards (same latent shape, per-row token timesteps).
    """

    family = "wan-ti2v"
    capabilities = Capabilities(output="video", input_images=(0, 1), fields=WAN_FIELDS)

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        self._image_pipe: Any = None

    def defaults(self) -> PipelineDefaults:
        return PipelineDefaults(values=dict(TI2V_DEFAULTS), derive=self._derive)

    @property
    def image_pipe(self) -> Any:
        """diffusers' WanImageToVideoPipeline over this checkpoint's modules (for its image helpers)."""
        if self._image_pipe is None:
            from diffusers import WanImageToVideoPipeline

            p = self.pipe
            self._image_pipe = WanImageToVideoPipeline(
                tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                transformer=p.transformer, transformer_2=p.transformer_2, image_encoder=None, image_processor=None,
                boundary_ratio=p.config.boundary_ratio, expand_timesteps=True,
            )
        return self._image_pipe

    def _prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        if not params.images:
            state = super()._prepare(params, request_id)
            state.extras["token_mask"] = torch.ones_like(state.latents[0, 0, :, ::2, ::2]).flatten()
            return state
        pipe, n = self.image_pipe, params.num_outputs_per_prompt
        cond, uncond = self._encode(params, params.guidance_scale > 1.0)
        scheduler, timesteps = self._schedule(params)
        pixels = pipe.video_processor.preprocess(params.images[0], height=params.height, width=params.width)
        pixels = pixels.to(self.device, dtype=torch.float32)
        generator = params.generator()
        size = (params.height, params.width, params.num_frames)
        latents, condition, mask = pipe.prepare_latents(
            pixels, n, pipe.vae.config.z_dim, *size, torch.float32, self.device, generator, None, None
        )
        scheduler.set_begin_index(0)
        extras = {"condition": condition, "mask": mask, "token_mask": mask[0][0][:, ::2, ::2].flatten()}
        return self._state(params, request_id, latents, scheduler, timesteps, generator, cond, uncond, extras)

    def _timestep(self, state: DiffusionState) -> torch.Tensor:
        return (state.extras["token_mask"] * state.current_timestep).unsqueeze(0).expand(state.rows, -1)

    def _with_condition(self, state: DiffusionState) -> torch.Tensor:
        mask = state.extras.get("mask")
        if mask is None:
            return state.latents
        return (1 - mask) * state.extras["condition"] + mask * state.latents

    _model_input = _with_condition
    _final_latents = _with_condition
