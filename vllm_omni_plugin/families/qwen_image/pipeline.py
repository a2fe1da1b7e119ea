"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Layered as step-wise pipelines.

The math follows diffusers 0.42 `QwenImage*Pipeline.__call__` step for step
(prompt template and encoding, latent packing, `calculate_shift` -> mu, sigmas,
true CFG with norm rescale, VAE decode); the diffusers pipeline object supplies
the components and its small helpers (encode_prompt, prepare_latents, packing).

Batching: the transformer takes per-row timesteps, so rows of different
requests at different steps share one forward as long as their image token
layout (`img_shapes`) is the same. Text of different lengths is right-padded
with zeros and masked (`encoder_hidden_states_mask`), which is what diffusers
does for a batch of prompts; RoPE text positions start after the image grid, so
padding does not move them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch

from ...diffusion.capabilities import Capabilities, InvalidParams, Knob
from ...diffusion import cuda_graphs, step_cache
from ...diffusion.interface import StepwisePipeline, preview_latents, resize_previews
from ...diffusion.parallel import sequence_shard
from ...diffusion.output import DiffusionOutput
from ...diffusion.params import PipelineDefaults, ResolvedParams
from ...diffusion.state import CfgLayout, DiffusionState

PROMPT_CACHE_SIZE = 32

# What every Qwen-Image family reads (`guidance_scale` only on guidance-distilled
# checkpoints: added per instance, see QwenImageStepwise.__init__).
QWEN_FIELDS = frozenset({
    "negative_prompt", "height", "width", "num_inference_steps", "true_cfg_scale", "max_sequence_length",
})


def _calculate_shift(image_seq_len: int, config: Any) -> float:
    # Same formula and config keys as diffusers' qwenimage `calculate_shift`.
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def _true_cfg_that_runs(v: Mapping[str, Any]) -> dict[str, Any]:
    """Report true CFG as it will run: diffusers runs it only with a negative prompt and a
    scale > 1; otherwise neither the scale nor the negative prompt is used (both resolve to None)."""
    scale = v.get("true_cfg_scale")
    if scale is not None and scale > 1 and v.get("negative_prompt") is not None:
        return {}
    return {"true_cfg_scale": None, "negative_prompt": None}


def _dims_for_area(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels at aspect `ratio`, multiples of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


class QwenImageStepwise(StepwisePipeline):
    """Text-to-image (QwenImagePipeline)."""

    family = "qwen-image"
    capabilities = Capabilities(output="image", fields=QWEN_FIELDS, partial_images=True)
    supports_step_cache = True
    #: dit_options cuda_graphs: the forward was checked for host data and syncs (graphs.py)
    supports_cuda_graphs = True

    def __init__(self, pipe: Any, model_id: str = "", batch_cfg: bool = True) -> None:
        super().__init__(pipe, model_id, batch_cfg)
        if pipe.transformer.config.guidance_embeds:  # a guidance-distilled checkpoint reads guidance_scale
            self.capabilities = self.capabilities.with_fields("guidance_scale")
        self._partial_vae: Any = None  # decode_partial's own VAE (made on first use)
        # text -> [1, L, D] embeddings encoded alone (see "Text encoding" below)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ---- parameters -------------------------------------------------------------
    @property
    def multiple_of(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def defaults(self) -> PipelineDefaults:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return PipelineDefaults(
            values=dict(
                num_inference_steps=50,
                true_cfg_scale=4.0,
                height=size,
                width=size,
                max_sequence_length=512,
            ),
            derive=self._derive,
        )

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        m = self.multiple_of
        # The sizes the latents really have (diffusers rounds down to the packing grid).
        return {"height": v["height"] // m * m, "width": v["width"] // m * m, **_true_cfg_that_runs(v)}

    # ---- prepare ------------------------------------------------------------------
    # Text encoding. The embeddings of one text do not depend on the request
    # (num_outputs_per_prompt repeats them, max_sequence_length cuts them), so they
    # are kept per text:
    #   * alone-encoded texts (diffusers' single-prompt `encode_prompt`, bit for bit)
    #     go to a small LRU cache (a shared negative prompt is encoded once);
    #   * the texts of requests admitted together are encoded in ONE text-encoder
    #     call (`encode_texts`, diffusers' own list-of-prompts encoding, deduplicated)
    #     and serve those requests only. They differ from alone-encoded ones by
    #     float rounding (the encoder sees another batch shape), so they never enter
    #     the cache: `generate()` stays bit-exact against diffusers whatever ran before.

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def _text_embeds(self, text: str) -> torch.Tensor:
        """[1, L, D] embeddings of one text encoded alone (cached); a single prompt is never padded."""
        cache = self._prompt_cache
        if text in cache:
            cache.move_to_end(text)
            return cache[text]
        embeds, _ = self.pipe._get_qwen_prompt_embeds([text], self.device)
        cache[text] = embeds
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
        return embeds

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """text -> [1, L_text, D] for every distinct text, with at most ONE text-encoder call.

        Cached texts come from the cache; a single missing text is encoded alone
        (and cached); several missing texts are encoded together, right-padded as
        diffusers pads a list of prompts, and each is cut back to its own length.
        """
        unique = list(dict.fromkeys(texts))
        cache = self._prompt_cache
        out = {t: self._text_embeds(t) for t in unique if t in cache}
        missing = [t for t in unique if t not in out]
        if len(missing) == 1:
            out[missing[0]] = self._text_embeds(missing[0])
        elif missing:
            embeds, mask = self.pipe._get_qwen_prompt_embeds(missing, self.device)
            for i, (text, length) in enumerate(zip(missing, mask.sum(dim=1).tolist())):
                out[text] = embeds[i : i + 1, :length].clone()
        return out

    def _texts(self, params: ResolvedParams) -> list[str]:
        """The texts `_prepare` will encode without an image (encoded together by `prepare_many`)."""
        texts = [params.prompt]
        if self._cfg(params).branches == 2:
            texts.append(params.negative_prompt)
        return texts

    def _encode(
        self, text: str, params: ResolvedParams, encoded: dict[str, torch.Tensor] | None = None, **kw: Any
    ) -> dict[str, Any]:
        """Model text inputs of one branch of one request: diffusers' `encode_prompt` semantics."""
        n, max_len = params.num_outputs_per_prompt, params.max_sequence_length
        if kw:  # image-conditioned (Edit): per request, through the pipeline's own encode_prompt
            embeds, mask = self.pipe.encode_prompt(
                prompt=text, device=self.device, num_images_per_prompt=n, max_sequence_length=max_len, **kw
            )
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
        base = encoded[text] if encoded and text in encoded else self._text_embeds(text)
        base = base[:, :max_len]
        embeds = base.repeat(1, n, 1).view(n, base.shape[1], -1)  # as encode_prompt repeats
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": None}

    def prepare_many(self, params: list[ResolvedParams], request_ids: list[str]) -> list[DiffusionState | Exception]:
        """Prepare requests admitted together: all their prompts in one text-encoder call."""
        with torch.no_grad():
            encoded = self.encode_texts([t for p in params for t in self._texts(p)])
            out: list[DiffusionState | Exception] = []
            for p, rid in zip(params, request_ids):
                try:
                    out.append(self._prepare(p, rid, encoded))
                except Exception as exc:  # noqa: BLE001 -- reported as that request's error by the engine
                    out.append(exc)
        return out

    def _cfg(self, params: ResolvedParams, renorm: bool = True) -> CfgLayout:
        scale = params.true_cfg_scale if params.true_cfg_scale is not None else 1.0
        if scale > 1 and params.negative_prompt is not None:
            return CfgLayout("true_cfg", (float(scale),) * params.num_inference_steps, renorm=renorm)
        return CfgLayout("none")

    def _timesteps(self, params: ResolvedParams, sigmas: np.ndarray, mu: float) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(params.num_inference_steps, device=self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, scheduler.timesteps

    def _state(self, params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras):
        image_latents = extras.get("image_latents")
        image_tokens = latents.shape[1] + (0 if image_latents is None else image_latents.shape[1])
        extras = {**extras, "guidance": self._guidance(params)}
        tokens = image_tokens + cond["encoder_hidden_states"].shape[1]
        return self.make_state(
            params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras, tokens
        )

    def _guidance(self, params: ResolvedParams) -> float | None:
        if self.pipe.transformer.config.guidance_embeds:
            if params.guidance_scale is None:
                raise ValueError("guidance_scale is required for a guidance-distilled Qwen-Image model")
            return float(params.guidance_scale)
        return None

    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        with torch.no_grad():
            return self._prepare(params, request_id)

    def _prepare(self, params: ResolvedParams, request_id: str, encoded: dict | None = None) -> DiffusionState:
        pipe, n = self.pipe, params.num_outputs_per_prompt
        height, width = params.height, params.width
        cfg = self._cfg(params)
        generator = params.generator()
        cond = self._encode(params.prompt, params, encoded)
        uncond = self._encode(params.negative_prompt, params, encoded) if cfg.branches == 2 else None
        channels = pipe.transformer.config.in_channels // 4
        latents = pipe.prepare_latents(
            n, channels, height, width, cond["encoder_hidden_states"].dtype, self.device, generator
        )
        vsf = pipe.vae_scale_factor
        sigmas = np.linspace(1.0, 1 / params.num_inference_steps, params.num_inference_steps)
        scheduler, timesteps = self._timesteps(params, sigmas, _calculate_shift(latents.shape[1], pipe.scheduler.config))
        extras = {"img_shapes": ((1, height // vsf // 2, width // vsf // 2),)}
        return self._state(params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras)

    # ---- denoise ------------------------------------------------------------------
    def batch_key(self, state: DiffusionState) -> Any:
        ex = state.extras
        image_latents = ex.get("image_latents")
        return (
            self.model_id,
            ex["img_shapes"],
            None if image_latents is None else tuple(image_latents.shape[1:]),
            ex.get("additional_t_cond") is not None,
            ex.get("guidance") is not None,
            state.latents.dtype,
        )

    def text_layout(self, state: DiffusionState, branch: int) -> Any:
        text = state.cond if branch == 0 else state.uncond
        return text["encoder_hidden_states"].shape[1], text["encoder_hidden_states_mask"] is None

    def _model_input(self, state: DiffusionState) -> torch.Tensor:
        image_latents = state.extras.get("image_latents")
        if image_latents is None:
            return state.latents
        return torch.cat([state.latents, image_latents], dim=1)

    @torch.no_grad()
    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        return self.guided_predictions(states, self._forward)

    def _forward(self, blocks: list[tuple[DiffusionState, int]]) -> torch.Tensor:
        """One transformer call over the rows of (state, branch) blocks."""
        hidden, timesteps, texts, guidance, t_cond = [], [], [], [], []
        for s, branch in blocks:
            x = self._model_input(s)
            hidden.append(x)
            timesteps.append(s.current_timestep.expand(s.rows).to(s.latents.dtype) / 1000)
            texts.append(s.cond if branch == 0 else s.uncond)
            if s.extras.get("guidance") is not None:
                guidance.append(torch.full([s.rows], s.extras["guidance"], device=x.device, dtype=torch.float32))
            if s.extras.get("additional_t_cond") is not None:
                t_cond.append(s.extras["additional_t_cond"])
        embeds, mask = _pad_text(texts)
        rows = sum(s.rows for s, _ in blocks)
        with self._step_cache(blocks):
            return self.pipe.transformer(
                hidden_states=torch.cat(hidden),
                timestep=torch.cat(timesteps),
                guidance=torch.cat(guidance) if guidance else None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=[list(blocks[0][0].extras["img_shapes"])] * rows,
                attention_kwargs={},
                return_dict=False,
                **({"additional_t_cond": torch.cat(t_cond)} if t_cond else {}),
            )[0]

    def check_capturable(self, transformer: Any) -> None:
        """Refuse a DiT whose forward a CUDA graph cannot capture; fix what can be fixed (graphs.py)."""
        from .graphs import check_capturable

        check_capturable(transformer)

    def _step_cache(self, blocks: list[tuple[DiffusionState, int]]) -> Any:
        """A context that switches step caching on for this forward when one of its requests asked for it
        (and CUDA graphs off: a cached forward's row plan is decided on the host, per forward)."""
        if all(s.params.cache_threshold is None for s, _ in blocks):
            return contextlib.nullcontext()
        cached = step_cache.install(self.pipe.transformer)
        row_blocks, start = [], 0
        for s, branch in blocks:
            store = s.extras.setdefault("step_cache", ({}, {}))[branch]
            row_blocks.append(step_cache.RowBlock(start, s.rows, s.params.cache_threshold, store))
            start += s.rows
        transformer = self.pipe.transformer
        if getattr(transformer, "zero_cond_t", False):
            raise ValueError("step caching does not support zero_cond_t Qwen-Image models (doubled timestep rows)")
        sp = self.parallel is not None and self.parallel.config.sp_degree > 1
        ctx = step_cache.CacheContext(
            row_blocks,
            agree=self.parallel.all_agree if sp else None,
            shard=functools.partial(sequence_shard, transformer) if sp else None,
        )
        stack = contextlib.ExitStack()
        stack.enter_context(cuda_graphs.off("step cache"))
        stack.enter_context(step_cache.active(cached, ctx))
        return stack

    # ---- decode -------------------------------------------------------------------
    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return latents / inv_std + mean

    def decode(self, state: DiffusionState) -> DiffusionOutput:
        with torch.no_grad():
            return self._decode(state)

    def _decode(self, state: DiffusionState) -> DiffusionOutput:
        return self._decode_images([state])[0]

    def decode_many(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        """One VAE call per group of finished states with the same size and output type."""
        groups: dict[tuple, list[DiffusionState]] = {}
        for s in states:
            groups.setdefault((s.params.height, s.params.width, s.params.output_type), []).append(s)
        outputs = {}
        with torch.no_grad():
            for group in groups.values():
                outputs.update(zip((s.request_id for s in group), self._decode_images(group)))
        return [outputs[s.request_id] for s in states]

    def decode_latents(self, latents: torch.Tensor, params: ResolvedParams, vae: Any = None,
                       output_type: str | None = None, downscale: int = 1) -> list[Any]:
        """Packed latents [rows, tokens, C] of `params`' size -> images (`params.output_type`, not "latent");
        `downscale` > 1: a preview from latents pooled by it (`preview_latents`; the images are smaller)."""
        vae = vae if vae is not None else self.pipe.vae
        latents = self.pipe._unpack_latents(latents, params.height, params.width, self.pipe.vae_scale_factor)
        latents = preview_latents(self._denormalize(latents), downscale)
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return list(self.pipe.image_processor.postprocess(image, output_type=output_type or params.output_type))

    # Partial images are previews at half the resolution (`partial_downscale`): the x0 estimate's
    # latents are average-pooled 2x2 before the VAE and the decoded image resized up to the request's
    # size. A quarter of the pixels through the decoder (on CPU ~7x cheaper: torch's CPU conv3d is
    # an im2col fallback, most of a decode) keeps 3 partial images within a few % of a request;
    # `partial_downscale = 1` decodes them at full resolution. The completed image is not affected.
    partial_downscale = 2

    def _partial_decoder(self) -> Any:
        """The VAE of the partial-decode thread: a private copy, since Qwen-Image's causal VAE keeps
        its feature cache in its modules during a decode, so a partial decode must not share the
        modules the step loop's final decodes use (the copy: the VAE's weights once more, ~250 MB
        for the full model in bf16)."""
        if self._partial_vae is None:
            self._partial_vae = copy.deepcopy(self.pipe.vae)
        return self._partial_vae

    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """An x0 estimate -> PIL previews of the request's size (see `partial_downscale`)."""
        images = self.decode_latents(latents, params, vae=self._partial_decoder(), output_type="pil",
                                     downscale=self.partial_downscale)
        return resize_previews(images, params.width, params.height)

    def _decode_images(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        p = states[0].params
        if p.output_type == "latent":
            return [DiffusionOutput(s.request_id, "latent", s.params, latents=s.latents) for s in states]
        images = self.decode_latents(torch.cat([s.latents for s in states]), p)
        outputs, start = [], 0
        for s in states:
            outputs.append(DiffusionOutput(s.request_id, "image", s.params, images=images[start : start + s.rows]))
            start += s.rows
        return outputs


def _pad_text(branches: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack text embeddings of several branches; right-pad with zeros and mask if lengths differ."""
    embeds = [b["encoder_hidden_states"] for b in branches]
    masks = [b["encoder_hidden_states_mask"] for b in branches]
    longest = max(e.shape[1] for e in embeds)
    if all(e.shape[1] == longest for e in embeds) and all(m is None for m in masks):
        return torch.cat(embeds), None
    padded, full_masks = [], []
    for e, m in zip(embeds, masks):
        rows, length, dim = e.shape
        if m is None:
            m = torch.ones(rows, length, dtype=torch.long, device=e.device)
        padded.append(torch.cat([e, e.new_zeros(rows, longest - length, dim)], dim=1))
        full_masks.append(torch.cat([m, m.new_zeros(rows, longest - length)], dim=1))
    return torch.cat(padded), torch.cat(full_masks)


class QwenImageEditStepwise(QwenImageStepwise):
    """Image + instruction -> image (QwenImageEditPipeline)."""

    family = "qwen-image-edit"
    capabilities = Capabilities(output="image", input_images=(1, 1), fields=QWEN_FIELDS, partial_images=True)
    #: which input image sets the default output size (diffusers: the first for Edit, the last for Edit Plus)
    _size_image = 0

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        images = v.get("images")
        if not images:
            raise InvalidParams(f"{self.family} needs an input image (`images`)", "image")
        w, h = images[self._size_image].size
        calc_w, calc_h = _dims_for_area(1024 * 1024, w / h)
        m = self.multiple_of
        height = v["height"] if "height" in explicit else calc_h
        width = v["width"] if "width" in explicit else calc_w
        return {"height": height // m * m, "width": width // m * m, **_true_cfg_that_runs(v)}

    def _texts(self, params: ResolvedParams) -> list[str]:
        return []  # the text is encoded with the request's image, per request

    def _conditions(self, params: ResolvedParams) -> tuple[Any, Any, list[tuple[int, int]]]:
        """(what the text encoder sees, what the VAE encodes, the VAE input's (width, height) per image)."""
        pipe, image = self.pipe, params.images[0]
        calc_w, calc_h = _dims_for_area(1024 * 1024, image.size[0] / image.size[1])
        image = pipe.image_processor.resize(image, calc_h, calc_w)
        return image, pipe.image_processor.preprocess(image, calc_h, calc_w).unsqueeze(2), [(calc_w, calc_h)]

    def _prepare(self, params: ResolvedParams, request_id: str, encoded: dict | None = None) -> DiffusionState:
        pipe, n = self.pipe, params.num_outputs_per_prompt
        height, width = params.height, params.width
        prompt_images, vae_images, vae_sizes = self._conditions(params)
        cfg = self._cfg(params)
        generator = params.generator()
        cond = self._encode(params.prompt, params, image=prompt_images)
        uncond = self._encode(params.negative_prompt, params, image=prompt_images) if cfg.branches == 2 else None
        channels = pipe.transformer.config.in_channels // 4
        latents, image_latents = pipe.prepare_latents(
            vae_images, n, channels, height, width, cond["encoder_hidden_states"].dtype, self.device, generator
        )
        vsf = pipe.vae_scale_factor
        sigmas = np.linspace(1.0, 1 / params.num_inference_steps, params.num_inference_steps)
        scheduler, timesteps = self._timesteps(params, sigmas, _calculate_shift(latents.shape[1], pipe.scheduler.config))
        # one RoPE block for the output, one per condition image
        img_shapes = ((1, height // vsf // 2, width // vsf // 2),
                      *((1, h // vsf // 2, w // vsf // 2) for w, h in vae_sizes))
        extras = {"img_shapes": img_shapes, "image_latents": image_latents}
        return self._state(params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras)


class QwenImageEditPlusStepwise(QwenImageEditStepwise):
    """Several images + instruction -> image (QwenImageEditPlusPipeline, Qwen-Image-Edit-2509 and later).

    As diffusers: each input image is shown to the text encoder at ~384x384
    ("Picture i: ..." in the prompt) and VAE-encoded at ~1024x1024, all at
    their own aspect; their latent tokens follow the noise tokens, one RoPE
    block per image; the default output size follows the LAST image.
    """

    family = "qwen-image-edit-plus"
    capabilities = Capabilities(output="image", input_images=(1, None), fields=QWEN_FIELDS, partial_images=True)
    _size_image = -1
    CONDITION_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE
    VAE_AREA = 1024 * 1024  # diffusers' VAE_IMAGE_SIZE

    def _conditions(self, params: ResolvedParams) -> tuple[Any, Any, list[tuple[int, int]]]:
        pipe = self.pipe
        condition_images, vae_images, vae_sizes = [], [], []
        for img in params.images:
            ratio = img.size[0] / img.size[1]
            cond_w, cond_h = _dims_for_area(self.CONDITION_AREA, ratio)
            vae_w, vae_h = _dims_for_area(self.VAE_AREA, ratio)
            condition_images.append(pipe.image_processor.resize(img, cond_h, cond_w))
            vae_images.append(pipe.image_processor.preprocess(img, vae_h, vae_w).unsqueeze(2))
            vae_sizes.append((vae_w, vae_h))
        return condition_images, vae_images, vae_sizes


class QwenImageLayeredStepwise(QwenImageStepwise):
    """Image -> RGBA layers (QwenImageLayeredPipeline). RGB inputs are converted to RGBA."""

    family = "qwen-image-layered"
    capabilities = Capabilities(
        output="layers",
        input_images=(1, 1),
        # the size comes from `resolution` and the image's aspect, never from height / width
        fields=(QWEN_FIELDS - {"height", "width"}) | {"layers", "resolution"},
        knobs={"cfg_normalize": Knob(bool, description="Renormalise the true-CFG prediction to the conditional norm."),
               "use_en_prompt": Knob(bool, description="Without a prompt, caption the input image in English "
                                                           "(else Chinese).")},
        background="transparent",  # RGBA layers
        partial_images=True,  # every layer's preview (decode_partial)
    )

    def defaults(self) -> PipelineDefaults:
        return PipelineDefaults(
            values=dict(
                num_inference_steps=50,
                true_cfg_scale=4.0,
                layers=4,
                resolution=640,
                max_sequence_length=512,
                cfg_normalize=False,
                use_en_prompt=False,
            ),
            derive=self._derive,
        )

    def _derive(self, v: dict[str, Any], explicit: frozenset[str]) -> dict[str, Any]:
        images = v.get("images")
        if not images:
            raise InvalidParams("Qwen-Image-Layered needs an input image (`images`)", "image")
        if v["resolution"] not in (640, 1024):
            raise InvalidParams(f"resolution must be 640 or 1024, got {v['resolution']!r}", "resolution")
        w, h = images[0].size
        calc_w, calc_h = _dims_for_area(v["resolution"] ** 2, w / h)
        m = self.multiple_of
        return {
            "height": calc_h // m * m,
            "width": calc_w // m * m,
            "images": [img if img.mode == "RGBA" else img.convert("RGBA") for img in images],
            **_true_cfg_that_runs(v),
        }

    def _cfg(self, params: ResolvedParams, renorm: bool = True) -> CfgLayout:
        return super()._cfg(params, renorm=bool(params.extra.get("cfg_normalize", False)))

    def _texts(self, params: ResolvedParams) -> list[str]:
        # An empty prompt is replaced by a caption of the image, made in `_prepare`.
        texts = super()._texts(params)
        return texts if params.prompt not in ("", " ") else texts[1:]

    def _prepare(self, params: ResolvedParams, request_id: str, encoded: dict | None = None) -> DiffusionState:
        pipe, n, layers = self.pipe, params.num_outputs_per_prompt, params.layers
        image = params.images[0]
        calc_w, calc_h = _dims_for_area(params.resolution**2, image.size[0] / image.size[1])
        height, width = params.height, params.width
        image = pipe.image_processor.resize(image, calc_h, calc_w)
        prompt_image = image
        image = pipe.image_processor.preprocess(image, calc_h, calc_w).unsqueeze(2).to(pipe.text_encoder.dtype)
        prompt = params.prompt
        if prompt in ("", " "):
            prompt = pipe.get_image_caption(prompt_image, use_en_prompt=params.extra["use_en_prompt"], device=self.device)
        cfg = self._cfg(params)
        generator = params.generator()
        cond = self._encode(prompt, params, encoded)
        uncond = self._encode(params.negative_prompt, params, encoded) if cfg.branches == 2 else None
        channels = pipe.transformer.config.in_channels // 4
        latents, image_latents = pipe.prepare_latents(
            image, n, channels, height, width, layers, cond["encoder_hidden_states"].dtype, self.device, generator
        )
        vsf = pipe.vae_scale_factor
        steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 0, steps + 1)[:-1]
        mu = (image_latents.shape[1] / (256 * 256 / 16 / 16)) ** 0.5
        scheduler, timesteps = self._timesteps(params, sigmas, mu)
        layer_shape = (1, height // vsf // 2, width // vsf // 2)
        img_shapes = (layer_shape,) * (layers + 1) + ((1, calc_h // vsf // 2, calc_w // vsf // 2),)
        extras = {
            "img_shapes": img_shapes,
            "image_latents": image_latents,
            "additional_t_cond": torch.zeros(latents.shape[0], dtype=torch.long, device=self.device),
        }
        return self._state(params, request_id, cfg, generator, cond, uncond, latents, scheduler, timesteps, extras)

    def decode_many(self, states: list[DiffusionState]) -> list[DiffusionOutput]:
        return [self.decode(s) for s in states]

    def _decode(self, state: DiffusionState) -> DiffusionOutput:
        p = state.params
        if p.output_type == "latent":
            return DiffusionOutput(state.request_id, "latent", p, latents=state.latents)
        image = self._decode_layers(state.latents, p, self.pipe.vae, p.output_type)
        per_output = p.layers
        layers = [list(image[i * per_output : (i + 1) * per_output]) for i in range(len(image) // per_output)]
        return DiffusionOutput(state.request_id, "layers", p, layers=layers)

    def _decode_layers(self, latents: torch.Tensor, p: ResolvedParams, vae: Any, output_type: str,
                       downscale: int = 1) -> list[Any]:
        """Packed latents -> each output's layers, flattened (output 0's layers in order, then
        output 1's, as the answer's `data` lists them); `downscale`: as in `decode_latents`."""
        latents = self.pipe._unpack_latents(latents, p.height, p.width, p.layers, self.pipe.vae_scale_factor)
        latents = self._denormalize(latents)
        b, c, f, h, w = latents.shape
        latents = latents[:, :, 1:]  # frame 0 is the composite of the input image
        latents = preview_latents(latents.permute(0, 2, 1, 3, 4).reshape(-1, c, 1, h, w), downscale)
        image = vae.decode(latents, return_dict=False)[0].squeeze(2)
        return list(self.pipe.image_processor.postprocess(image, output_type=output_type))

    def decode_partial(self, latents: torch.Tensor, params: ResolvedParams) -> list[Any]:
        """An x0 estimate -> a preview of every layer (RGBA), flattened as the completed images are:
        a layered request's partial image k is one `partial_image` event per layer, each with the
        `index` its layer has in the completed answer (docs/server.md)."""
        images = self._decode_layers(latents, params, self._partial_decoder(), "pil", self.partial_downscale)
        return resize_previews(images, params.width, params.height)
