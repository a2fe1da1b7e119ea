"""FLUX.1 (text-to-image) and FLUX.1 Kontext (image editing) as step-wise, step-batched pipelines.

The math is diffusers 0.42 `FluxPipeline.__call__` / `FluxKontextPipeline.__call__` step for
step: CLIP pooled + T5 text embeddings (`encode_prompt`), packed 2x2 latents with their RoPE ids
(`prepare_latents`), sigmas linspace(1, 1/N) shifted by mu from the image token count
(diffusers' own `calculate_shift` / `retrieve_timesteps`), the distilled guidance as a model
input, true CFG only with a negative prompt and `true_cfg_scale` > 1 (plain, no renorm), VAE
decode after un-scaling. The diffusers pipeline object supplies the components and helpers.

Batching: the transformer takes per-row timesteps and guidance, so rows of different requests
at different steps share a forward when their token layout is the same: the same latent grid
(RoPE ids depend on height and width, not only on the token count), the same Kontext
condition grid, the same text length. T5 text is always padded to `max_sequence_length`
(diffusers' `padding="max_length"`), so prompts of any length share forwards without a mask;
the attention of FLUX's transformer takes no mask, so nothing is ever padded here.

This module imports diffusers, never vLLM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from ...diffusion.capabilities import Capabilities, InvalidParams, Knob
from ...diffusion.interface import StepwisePipeline
from ...diffusion.output import DiffusionOutput
from ...diffusion.params import PipelineDefaults, ResolvedParams
from ...diffusion.state import CfgLayout, DiffusionState

#: What FLUX reads (`guidance_scale` only on guidance-distilled checkpoints, see FluxStepwise.__init__).
FLUX_FIELDS = frozenset({
    "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale",
    "max_sequence_length",
})
#: diffusers' `check_inputs`: T5 was trained with at most 512 tokens.
MAX_SEQUENCE_LENGTH = 512


class FluxStepwise(StepwisePipeline):
    """Text-to-image (FluxPipeline: FLUX.1-dev, -schnell and their fine-tunes)."""

    family = "flux"
    capabilities = Capabilities(output="image", fields=FLUX_FIELDS, partial_images=True)

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        self.guidance_distilled = bool(pipe.transformer.config.guidance_embeds)
        if not self.guidance_distilled:  # FLUX.1-schnell: diffusers drops guidance_scale; we refuse it
            self.capabilities = self.capabilities.without_fields("guidance_scale")

    # ---- parameters -------------------------------------------------------------
    @property
    def multiple_of(self) -> int:
        """Output sizes are multiples of this (VAE factor x 2x2 packing); diffusers rounds down."""
        return self.pipe.vae_scale_factor * 2

    def defaults(self) -> PipelineDefaults:
        """diffusers' `__call__` defaults: 28 steps, guidance 3.5, 512 T5 tokens, default_sample_size x VAE factor."""
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        values = dict(num_inference_steps=28, true_cfg_scale=1.0, height=size, width=size,
                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        if self.guidance_distilled:
            values["guidance_scale"] = 3.5
        return PipelineDefaults(values=values, derive=self._derive)

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        m = self.multiple_of
        return {"height": v["height"] // m * m, "width": v["width"] // m * m, **_common_derived(v)}

    # ---- prepare ------------------------------------------------------------------
    def _cfg(self, params: ResolvedParams) -> CfgLayout:
        if params.true_cfg_scale is not None:  # resolved to None unless it runs (_common_derived)
            return CfgLayout("true_cfg", (float(params.true_cfg_scale),) * params.num_inference_steps)
        return CfgLayout("none")

    def _encode(self, text: str, params: ResolvedParams) -> dict[str, torch.Tensor]:
        """One branch's text inputs, diffusers' `encode_prompt` (CLIP pooled + T5 sequence, repeated n times)."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=params.num_outputs_per_prompt,
            max_sequence_length=params.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _schedule(self, params: ResolvedParams, image_tokens: int) -> tuple[Any, torch.Tensor]:
        """A private scheduler with diffusers' sigmas and the mu of this image size."""
        steps = params.num_inference_steps
        scheduler = self.new_scheduler()
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def _condition(self, params: ResolvedParams) -> torch.Tensor | None:
        """The preprocessed input image (Kontext); None for text-to-image."""
        return None

    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        with torch.no_grad():
            return self._prepare(params, request_id)

    def _prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        pipe, cfg = self.pipe, self._cfg(params)
        cond = self._encode(params.prompt, params)
        uncond = self._encode(params.negative_prompt, params) if cfg.branches == 2 else None
        generator = params.generator()
        # the same calls, in the same order, as diffusers: the generator draws the same noise
        latents, image_latents, img_ids, condition_grid = self._latents(
            params, cond["encoder_hidden_states"].dtype, generator)
        scheduler, timesteps = self._schedule(params, latents.shape[1])
        m = self.multiple_of
        extras = {
            "img_ids": img_ids,
            "txt_ids": torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=self.device,
                                   dtype=pipe.text_encoder.dtype),
            "grid": (params.height // m, params.width // m),
            "image_latents": image_latents,
            "condition_grid": condition_grid,
            "guidance": float(params.guidance_scale) if self.guidance_distilled else None,
        }
        tokens = img_ids.shape[0] + cond["encoder_hidden_states"].shape[1]
        return self.make_state(params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps,
                               extras, tokens)

    def _latents(self, params: ResolvedParams, dtype: torch.dtype, generator: torch.Generator):
        """(packed noise latents, packed condition latents or None, RoPE ids of all image tokens,
        the condition's latent grid or None)."""
        latents, img_ids = self.pipe.prepare_latents(
            params.num_outputs_per_prompt, self.pipe.transformer.config.in_channels // 4, params.height,
            params.width, dtype, self.device, generator,
        )
        return latents, None, img_ids, None

    # ---- denoise ------------------------------------------------------------------
    def batch_key(self, state: DiffusionState) -> Any:
        return (
            self.model_id,
            state.extras["grid"],
            state.extras["condition_grid"],
            state.cond["encoder_hidden_states"].shape[1],
            state.latents.dtype,
        )

    @torch.no_grad()
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        return self.guided_predictions(states, self._forward)

    def _forward(self, blocks: list[tuple[DiffusionState, int]]) -> torch.Tensor:
        """One transformer call over the rows of (state, branch) blocks (one token layout: see batch_key)."""
        hidden, timesteps, embeds, pooled, guidance = [], [], [], [], []
        for s, branch in blocks:
            image_latents = s.extras["image_latents"]
            hidden.append(s.latents if image_latents is None else torch.cat([s.latents, image_latents], dim=1))
            timesteps.append(s.current_timestep.expand(s.rows).to(s.latents.dtype))
            text = s.cond if branch == 0 else s.uncond
            embeds.append(text["encoder_hidden_states"])
            pooled.append(text["pooled_projections"])
            if s.extras["guidance"] is not None:
                guidance.append(torch.full([s.rows], s.extras["guidance"], device=self.device, dtype=torch.float32))
        first = blocks[0][0].extras
        return self.pipe.transformer(
            hidden_states=torch.cat(hidden),
            timestep=torch.cat(timesteps) / 1000,
            guidance=torch.cat(guidance) if guidance else None,
            pooled_projections=torch.cat(pooled),
            encoder_hidden_states=torch.cat(embeds),
            txt_ids=first["txt_ids"],
            img_ids=first["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    # ---- decode -------------------------------------------------------------------
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        return self.decode_many([state])[0]

    def decode_many(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        """One VAE call per group of finished states with the same size and output type."""
        groups: dict[tuple, list[DiffusionState]] = {}
        for s in states:
            groups.setdefault((s.params.height, s.params.width, s.params.output_type), []).append(s)
        outputs: dict[str, DiffusionOutput] = {}
        with torch.no_grad():
            for group in groups.values():
                outputs.update(zip((s.request_id for s in group), self._decode_group(group)))
        return [outputs[s.request_id] for s in states]

    def _decode_latents(self, latents: torch.Tensor, p: ResolvedParams, output_type: str) -> list[Any]:
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents, p.height, p.width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return list(pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type=output_type))

    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """An x0 estimate -> PIL images. FLUX's AutoencoderKL keeps no state in its modules
        during a decode, so the engine's decode thread shares it with the step loop."""
        return self._decode_latents(latents.to(self.pipe.vae.dtype), params, "pil")

    def _decode_group(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        p = states[0].params
        if p.output_type == "latent":  # diffusers returns the packed latents
            return [DiffusionOutput(s.request_id, "latent", s.params, latents=s.latents) for s in states]
        images = self._decode_latents(torch.cat([s.latents for s in states]), p, p.output_type)
        outputs, start = [], 0
        for s in states:
            outputs.append(DiffusionOutput(s.request_id, "image", s.params, images=list(images[start : start + s.rows])))
            start += s.rows
        return outputs


def _common_derived(v: dict[str, Any]) -> dict[str, Any]:
    """Checks diffusers makes, and true CFG reported as it runs.

    diffusers runs true CFG only with a negative prompt and `true_cfg_scale` > 1; otherwise
    neither is used, and both resolve to None (reported parameters are the ones that ran).
    """
    length = v["max_sequence_length"]
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise InvalidParams(
            f"max_sequence_length must be an integer in [1, {MAX_SEQUENCE_LENGTH}], got {length!r}", "max_sequence_length"
        )
    scale = v.get("true_cfg_scale")
    if scale is not None and scale > 1 and v.get("negative_prompt") is not None:
        return {}
    return {"true_cfg_scale": None, "negative_prompt": None}


class FluxKontextStepwise(FluxStepwise):
    """Instruction (+ an optional input image) -> image (FluxKontextPipeline: FLUX.1-Kontext-dev).

    As diffusers: the output has about `max_area` pixels at the aspect of the requested (or
    default) height x width; the input image is resized to the trained Kontext resolution
    nearest its aspect, VAE-encoded (its latent mode, no noise drawn) and its tokens follow
    the noise tokens with RoPE ids of index 1.
    """

    family = "flux-kontext"
    capabilities = Capabilities(
        output="image", input_images=(0, 1), fields=FLUX_FIELDS, partial_images=True,
        knobs={"max_area": Knob(int, description="About how many pixels the output has (default 1024*1024); "
                                "its size keeps the aspect of the requested size or the input image.")},
    )

    def defaults(self) -> PipelineDefaults:
        base = super().defaults()
        return PipelineDefaults(values={**base.values, "max_area": 1024**2}, derive=base.derive)

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        area = v["max_area"]
        if not isinstance(area, int) or isinstance(area, bool) or area < 1:
            raise InvalidParams(f"max_area must be a positive integer (pixels), got {area!r}", "max_area")
        aspect = v["width"] / v["height"]
        m = self.multiple_of
        width = round((area * aspect) ** 0.5) // m * m
        height = round((area / aspect) ** 0.5) // m * m
        if width < m or height < m:
            raise InvalidParams(f"max_area={area} at aspect {aspect:.3g} leaves no {m}x{m} pixel tile", "max_area")
        return {"height": height, "width": width, **_common_derived(v)}

    def _condition(self, params: ResolvedParams) -> torch.Tensor | None:
        if not params.images:
            return None
        processor, image, m = self.pipe.image_processor, params.images[0], self.multiple_of
        height, width = processor.get_default_height_width(image)
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        width, height = width // m * m, height // m * m
        return processor.preprocess(processor.resize(image, height, width), height, width)

    def _latents(self, params: ResolvedParams, dtype: torch.dtype, generator: torch.Generator):
        image = self._condition(params)
        latents, image_latents, latent_ids, image_ids = self.pipe.prepare_latents(
            image, params.num_outputs_per_prompt, self.pipe.transformer.config.in_channels // 4, params.height,
            params.width, dtype, self.device, generator,
        )
        if image is None:
            return latents, None, latent_ids, None
        grid = (image.shape[-2] // self.multiple_of, image.shape[-1] // self.multiple_of)
        return latents, image_latents, torch.cat([latent_ids, image_ids], dim=0), grid
