"""GLM-Image's DiT stage as a step-wise pipeline: prior tokens + grid -> image.

The AR stage (vLLM, families/glm_image/vllm_model.py) generates the image's prior tokens
on the target grid the request's size names; the orchestrator hands them
over as a `GlmImagePrior` keyed by request id, this stage's typed input
submitted with the request (diffusion/handover.py). This stage
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

Image-to-image: the request's images condition the DiT as diffusers does
it -- each resized to multiples of 16 px, VAE-encoded (mode), and run once
through the transformer with its own prior tokens (its VQ codes, upsampled)
to fill a per-request `GlmImageKVCache` that every conditional forward reads.
The codes come from GLM-Image's image tokenizer (the AR model's vision encoder
+ VQ, `image_tokens.image_codes`), loaded here from `vision_language_encoder/` without the
text model: vLLM's AR stage computes the same codes for its prompt but
returns no prompt-side values, so this stage tokenizes its own inputs.

The diffusers pipeline object is loaded without its `vision_language_encoder`
(the AR model runs in vLLM, not here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .prompt import TOKEN_PIXELS, check_size
from ...diffusion.capabilities import Capabilities
from ...diffusion.handover import check_stage_input
from ...diffusion.interface import StepwisePipeline
from ...diffusion.output import DiffusionOutput
from ...diffusion.params import PipelineDefaults, ResolvedParams
from ...diffusion.state import CfgLayout, DiffusionState


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
            raise RuntimeError(f"{self.request_id}: {len(self.token_ids)} prior tokens for a {h}x{w} grid")


class GlmImageStepwise(StepwisePipeline):
    """Text-to-image from handed-over prior tokens (diffusers' GlmImagePipeline after its AR step)."""

    family = "glm-image"
    capabilities = Capabilities(
        output="image",
        input_images=(0, None),  # text-to-image, or image-to-image with condition images
        fields=frozenset({"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"}),
        orchestrator="glm_image",  # the AR prior in vLLM -> this DiT (families/glm_image/orchestrator.py)
        partial_images=True,  # flow matching's x0 = x_t - sigma v (the base x0_estimate), its VAE decodes it
    )

    #: the AR prior's tokens, handed over with every request (it has no prior of its own)
    stage_input_type = GlmImagePrior
    stage_input_required = True

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True, image_tokenizer: Any = None) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        #: (vision encoder, VQ model): condition images -> VQ codes (image-to-image)
        self.image_tokenizer = image_tokenizer

    # ---- parameters -------------------------------------------------------------
    def defaults(self) -> PipelineDefaults:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return PipelineDefaults(
            values=dict(num_inference_steps=50, guidance_scale=1.5, height=size, width=size, max_sequence_length=2048),
            derive=self._derive,
        )

    @staticmethod
    def _derive(v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        out = {}
        images = v.get("images")
        if images and not {"height", "width"} & explicit:
            # Image-to-image without a size: the first image's, floored to the 32-px grid.
            w, h = images[0].size
            out = {"height": h // TOKEN_PIXELS * TOKEN_PIXELS, "width": w // TOKEN_PIXELS * TOKEN_PIXELS}
        check_size(out.get("height", v["height"]), out.get("width", v["width"]))  # refused at resolve: a 400
        return out

    # ---- prepare ------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, params: ResolvedParams, request_id: str, stage_input: GlmImagePrior | None = None) -> DiffusionState:
        from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

        pipe, device, n = self.pipe, self.device, params.num_outputs_per_prompt
        prior = stage_input
        check_stage_input(self, request_id, prior)  # the engine checked it; a direct call too
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
            "kv_caches": self._condition(params, embeds, generator) if params.images else None,
            "prior_token_id": prior_ids,
            "target_size": torch.tensor([[height, width]], dtype=embeds.dtype, device=device).repeat(n, 1),
            "crop_coords": torch.zeros((n, 2), dtype=embeds.dtype, device=device),
        }
        tokens = latents.shape[2] * latents.shape[3] // pipe.transformer.config.patch_size**2 + embeds.shape[1]
        return self.make_state(
            params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras, tokens
        )

    def _condition(self, params: ResolvedParams, embeds: torch.Tensor, generator: torch.Generator) -> Any:
        """Image-to-image: the condition images' KV cache (diffusers' "write" pass, per request)."""
        from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
        from diffusers.pipelines.glm_image.pipeline_glm_image import retrieve_latents

        from .image_tokens import image_codes

        if self.image_tokenizer is None:
            raise ValueError(f"{self.model_id}: no vision_language_encoder to tokenize condition images with")
        pipe, device, vae = self.pipe, self.device, self.pipe.vae
        images = [image.convert("RGB") for image in params.images]
        ar_inputs = pipe.processor.image_processor(images=images, return_tensors="pt")
        grids = ar_inputs["image_grid_thw"].to(device)
        codes = image_codes(*self.image_tokenizer, ar_inputs["pixel_values"].to(device), grids)
        transformer = pipe.transformer
        cache = GlmImageKVCache(num_layers=transformer.config.num_layers)
        cache.set_mode("write")
        shape = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, embeds.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(device, embeds.dtype)
        for image, code, (_, h, w) in zip(images, codes, grids.tolist()):
            # The VAE sees the image at its token grid's size (32 px per AR token, so the
            # upsampled codes cover the DiT's patches exactly). diffusers floors the image to
            # 16 px instead, which equals this where its codes fit (sides multiples of 32 that
            # the image processor keeps) and fails with a shape error elsewhere.
            height, width = h * TOKEN_PIXELS, w * TOKEN_PIXELS
            pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device, embeds.dtype)
            latent = (retrieve_latents(vae.encode(pixels), generator=generator, sample_mode="argmax") - mean) / std
            prior = pipe._upsample_token_ids(code, h, w).squeeze(0)
            transformer(
                hidden_states=latent, encoder_hidden_states=torch.zeros_like(embeds)[:1, :0],
                prior_token_id=prior, prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                timestep=torch.zeros((1,), device=device), target_size=torch.tensor([pixels.shape[-2:]], device=device),
                crop_coords=torch.zeros((1, 2), device=device), kv_caches=cache,
            )  # fmt: skip
        cache.next_sample()
        return cache

    # ---- denoise ------------------------------------------------------------------
    def batch_key(self, state: DiffusionState) -> Any:
        return (self.model_id, state.params.height, state.params.width, state.latents.dtype)

    @torch.no_grad()
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        # One forward per branch of each request: diffusers' own sequence of calls
        # (glyph embeddings differ in length per prompt, and the model takes no text mask).
        preds = []
        for s in states:
            cache = s.extras["kv_caches"]
            if cache is not None:
                cache.set_mode("read")  # the conditional branch sees the condition images
            cond = self._forward(s, s.cond)
            if s.uncond is None:
                preds.append(cond)
                continue
            if cache is not None:
                cache.set_mode("skip")  # the unconditional one does not
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
            kv_caches=s.extras["kv_caches"],  # image-to-image's condition images; None for text-to-image
        )[0].float()

    # ---- decode -------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, state: DiffusionState) -> DiffusionOutput:
        p = state.params
        if p.output_type == "latent":
            return DiffusionOutput(state.request_id, "latent", p, latents=state.latents)
        images = self._decode_latents(state.latents, p.output_type, state.generator)
        return DiffusionOutput(state.request_id, "image", p, images=images)

    @torch.no_grad()
    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """An x0 estimate -> PIL images. diffusers' AutoencoderKL keeps no state in its modules
        during a decode (and draws nothing from the generator), so the decode thread shares it."""
        return self._decode_latents(latents, "pil", None)

    def _decode_latents(self, latents: torch.Tensor, output_type: str, generator: Any) -> list[Any]:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents * std + mean, return_dict=False, generator=generator)[0]
        return list(self.pipe.image_processor.postprocess(image, output_type=output_type))


def load_glm_image_pipeline(
    path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> GlmImageStepwise:
    """GLM-Image's DiT stage from a GLM-Image checkpoint (everything but the AR model)."""
    from diffusers import GlmImagePipeline

    from ...diffusion.loader import default_load_config

    config = default_load_config(dtype, device)
    pipe = GlmImagePipeline.from_pretrained(str(path), vision_language_encoder=None, dtype=config.dtype)
    pipe.to(config.device)
    pipe.set_progress_bar_config(disable=True)
    return GlmImageStepwise(pipe, model_id=str(path), image_tokenizer=load_image_tokenizer(
        Path(path) / "vision_language_encoder", config.dtype, config.device))


def load_image_tokenizer(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """GLM-Image's vision encoder and VQ model from the AR checkpoint, without its text model."""
    from safetensors import safe_open
    from transformers import GlmImageConfig
    from transformers.models.glm_image.modeling_glm_image import GlmImageVisionModel, GlmImageVQVAE

    config = GlmImageConfig.from_pretrained(path)
    config.vision_config._attn_implementation = "sdpa"
    parts = {"model.visual.": GlmImageVisionModel._from_config(config.vision_config),
             "model.vqmodel.": GlmImageVQVAE._from_config(config.vq_config)}
    states: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in parts}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                prefix = next((p for p in parts if name.startswith(p)), None)
                if prefix is not None:
                    states[prefix][name[len(prefix):]] = f.get_tensor(name)
    for prefix, module in parts.items():
        module.load_state_dict(states[prefix], strict=True)
        module.to(device=device, dtype=dtype).eval()
    return parts["model.visual."], parts["model.vqmodel."]
