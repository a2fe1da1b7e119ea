"""GLM-Image's DiT stage as a step-wise pipeline: prior tokens + grid -> image.

The AR stage (vLLM, models/glm_image.py) generates the image's prior tokens
on the target grid the request's size names; the orchestrator hands them
over as a `GlmImagePrior` keyed by request id (`pipeline.priors`). This stage
renders them with diffusers' `GlmImageTransformer2DModel`, following
diffusers 0.42 `GlmImagePipeline.__call__` step for step from where its
`generate_prior_tokens` returns: the prior tokens upsampled x2 to the DiT's
patch grid, ByT5 glyph embeddings of the quoted text in the prompt (an empty
text for the unconditional branch), latents drawn first from the request's
generator, the integer-spaced shifted schedule, CFG as
uncond + scale * (cond - uncond) with the prior tokens dropped on the
unconditional branch, and the VAE decode.

Sizes: the AR grid is one token per 32 px, so height and width are multiples
of 32 (glm_image_prompt.ALLOWED_SIZES); anything else is refused when the
request resolves, with the list of allowed sizes.

The diffusers pipeline object is loaded without its `vision_language_encoder`
(the AR model runs in vLLM, not here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...models.glm_image_prompt import TOKEN_PIXELS, check_size
from ..handover import HandOverStore
from ..interface import StepwisePipeline
from ..output import DiffusionOutput
from ..params import PipelineDefaults, ResolvedParams
from ..state import CfgLayout, DiffusionState


@dataclass(frozen=True)
class GlmImagePrior:
    """The AR -> DiT hand-over of one request.

    token_ids   the image's prior tokens (VQ codes), grid_h * grid_w of them, row-major
    grid        (grid_h, grid_w): the AR grid, one token per 32 px of the output
    """

    request_id: str
    token_ids: tuple[int, ...]
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.grid
        if len(self.token_ids) != h * w:
            raise ValueError(f"{self.request_id}: {len(self.token_ids)} prior tokens for a {h}x{w} grid")


class GlmImageStepwise(StepwisePipeline):
    """Text-to-image from handed-over prior tokens (diffusers' GlmImagePipeline after its AR step)."""

    family = "glm-image"

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        #: prior tokens handed over by the AR stage, keyed by request id
        self.priors: HandOverStore[GlmImagePrior] = HandOverStore()

    # ---- parameters -------------------------------------------------------------
    def defaults(self) -> PipelineDefaults:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return PipelineDefaults(
            values=dict(num_inference_steps=50, guidance_scale=1.5, height=size, width=size, max_sequence_length=2048),
            derive=self._derive,
        )

    @staticmethod
    def _derive(v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        check_size(v["height"], v["width"])  # refused here, at resolve: the request gets a 400
        return {}

    # ---- prepare ------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

        pipe, device, n = self.pipe, self.device, params.num_outputs_per_prompt
        prior = self.priors.pop(request_id)
        if prior is None:
            raise RuntimeError(f"{request_id}: no prior tokens were handed over by the AR stage")
        height, width = params.height, params.width
        if (prior.grid[0] * TOKEN_PIXELS, prior.grid[1] * TOKEN_PIXELS) != (height, width):
            raise RuntimeError(f"{request_id}: prior grid {prior.grid} does not render {height}x{width}")
        gs = params.guidance_scale
        cfg = CfgLayout("cfg", (float(gs),) * params.num_inference_steps) if gs > 1 else CfgLayout("none")
        embeds, negative = pipe.encode_prompt(
            params.prompt, cfg.branches == 2, num_images_per_prompt=n,
            max_sequence_length=params.max_sequence_length, device=device, dtype=pipe.transformer.dtype,
        )  # fmt: skip
        generator = params.generator()
        latents = pipe.prepare_latents(
            n, pipe.transformer.config.in_channels, height, width, embeds.dtype, device, generator
        )
        prior_ids = pipe._upsample_token_ids(torch.tensor(prior.token_ids, device=device), *prior.grid)
        prior_ids = prior_ids.repeat_interleave(n, dim=0)
        cond = {"encoder_hidden_states": embeds, "prior_token_drop": torch.zeros_like(prior_ids, dtype=torch.bool)}
        uncond = None
        if cfg.branches == 2:
            uncond = {"encoder_hidden_states": negative, "prior_token_drop": torch.ones_like(prior_ids, dtype=torch.bool)}
        scheduler = self.new_scheduler()
        config = scheduler.config
        seq_len = (height // pipe.vae_scale_factor) * (width // pipe.vae_scale_factor) // pipe.transformer.config.patch_size**2
        steps = params.num_inference_steps
        timesteps = np.linspace(config.num_train_timesteps, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
        mu = calculate_shift(
            seq_len, config.get("base_image_seq_len", 256), config.get("base_shift", 0.25), config.get("max_shift", 0.75)
        )
        timesteps, _ = retrieve_timesteps(
            scheduler, steps, device, timesteps, timesteps / config.num_train_timesteps, mu=mu
        )
        extras = {
            "prior_token_id": prior_ids,
            "target_size": torch.tensor([[height, width]], dtype=embeds.dtype, device=device).repeat(n, 1),
            "crop_coords": torch.zeros((n, 2), dtype=embeds.dtype, device=device),
        }
        tokens = latents.shape[2] * latents.shape[3] // pipe.transformer.config.patch_size**2 + embeds.shape[1]
        return self.make_state(
            params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras, tokens
        )

    # ---- denoise ------------------------------------------------------------------
    def batch_key(self, state: DiffusionState) -> Any:
        return (self.model_id, state.params.height, state.params.width, state.latents.dtype)

    @torch.no_grad()
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        # One forward per branch of each request: diffusers' own sequence of calls
        # (glyph embeddings differ in length per prompt, and the model takes no text mask).
        preds = []
        for s in states:
            cond = self._forward(s, s.cond)
            if s.uncond is None:
                preds.append(cond)
                continue
            uncond = self._forward(s, s.uncond)
            preds.append(uncond + s.guidance_scale_now() * (cond - uncond))
        return preds

    def _forward(self, s: DiffusionState, branch: dict[str, Any]) -> torch.Tensor:
        transformer = self.pipe.transformer
        return transformer(
            hidden_states=s.latents.to(transformer.dtype),
            encoder_hidden_states=branch["encoder_hidden_states"],
            prior_token_id=s.extras["prior_token_id"],
            prior_token_drop=branch["prior_token_drop"],
            timestep=s.current_timestep.expand(s.rows) - 1,
            target_size=s.extras["target_size"],
            crop_coords=s.extras["crop_coords"],
            return_dict=False,
            kv_caches=None,  # image-to-image's condition-image cache; text-to-image has none
        )[0].float()

    # ---- decode -------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        p = state.params
        if p.output_type == "latent":
            return DiffusionOutput(state.request_id, "latent", p, latents=state.latents)
        vae = self.pipe.vae
        latents = state.latents.to(vae.dtype)
        shape = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents * std + mean, return_dict=False, generator=state.generator)[0]
        images = list(self.pipe.image_processor.postprocess(image, output_type=p.output_type))
        return DiffusionOutput(state.request_id, "image", p, images=images)


def load_glm_image_pipeline(
    path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> GlmImageStepwise:
    """GLM-Image's DiT stage from a GLM-Image checkpoint (everything but the AR model)."""
    from diffusers import GlmImagePipeline

    from ..loader import default_load_config

    config = default_load_config(dtype, device)
    pipe = GlmImagePipeline.from_pretrained(str(path), vision_language_encoder=None, dtype=config.dtype)
    pipe.to(config.device)
    pipe.set_progress_bar_config(disable=True)
    return GlmImageStepwise(pipe, model_id=str(path))
