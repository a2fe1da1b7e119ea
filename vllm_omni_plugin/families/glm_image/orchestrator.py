"""GLM-Image's input processor (`glm_image_prior`): AR prior tokens -> the DiT stage.

    request (prompt, height x width, seed, source images for image-to-image)
      -> target_grids(height, width)          the size, turned ONCE into the grids
      -> AR prompt: chat template (source images as <|image|>) + <sop>H W<eop>
         [+ <sop>h w<eop>, text-to-image's preview] + image start
      -> AR stage (vLLM, GlmImageForConditionalGeneration): preview grid h x w,
         then the image grid H x W, then one end token; sampled with the
         checkpoint's generation_config.json read as transformers reads it
         (diffusers' `generate_prior_tokens` samples with it), seeded by the
         request's seed
      -> GlmImagePrior(request id, the H x W tokens, (H, W)): the DiT stage's typed
         input, submitted with the request
      -> DiT stage (families/glm_image/pipeline.py) renders height x width

The hand-over is keyed by request id; the AR request is `<id>:ar`.
"""

from __future__ import annotations

import functools
from typing import Any

from ...diffusion.params import ResolvedParams
from .pipeline import GlmImagePrior
from .positions import decode_tokens
from .prompt import target_grids
from ...request import RequestError
from ...orchestrator.stages import StageOrchestrator, StageTimings

# The sampling knobs diffusers' AR call takes from the generation config.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


class GlmImageOrchestrator(StageOrchestrator):
    answers_text = False  # GLM-Image's AR model only generates image tokens

    pipeline_loader = f"{__package__}.pipeline:load_glm_image_pipeline"

    @functools.cached_property
    def processor(self) -> Any:
        """The checkpoint's GlmImageProcessor (its `processor` folder): the AR prompt's chat template and
        tokenizer, read here -- the DiT stage's pipeline may live in another process."""
        from pathlib import Path

        from transformers.models.glm_image.processing_glm_image import GlmImageProcessor

        return GlmImageProcessor.from_pretrained(str(Path(self.model) / "processor"))

    @functools.cached_property
    def ar_sampling(self) -> dict[str, Any]:
        """The AR stage's sampling values: generation_config.json as transformers reads it
        (its defaults for what the file leaves out), under the stage config's."""
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(self.ar_model)
        values = {name: getattr(config, name) for name in SAMPLING_FIELDS if getattr(config, name) is not None}
        values.update(self.ar.default_sampling_params)
        return values

    def ar_prompt(self, resolved: ResolvedParams) -> tuple[dict[str, Any], Any]:
        """The AR stage's prompt for this request (token ids, source images), and its target grids."""
        processor = self.processor
        images = [image.convert("RGB") for image in resolved.images or ()]
        grids = target_grids(resolved.height, resolved.width, text_to_image=not images)
        content = [{"type": "image", "image": image} for image in images]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": resolved.prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False) + grids.suffix(processor.tokenizer.bos_token)
        prompt: dict[str, Any] = {"prompt_token_ids": processor.tokenizer(text, add_special_tokens=False)["input_ids"]}
        if images:
            prompt["multi_modal_data"] = {"image": images}  # vLLM expands each <|image|> to its patches
        return prompt, grids

    async def hand_over(self, resolved: ResolvedParams, rid: str, timings: StageTimings) -> GlmImagePrior:
        """The one function building the DiT stage's input: the AR prior's tokens for this request."""
        from vllm import SamplingParams as VllmSamplingParams

        prompt, grids = self.ar_prompt(resolved)
        needed = decode_tokens(grids.decode_grids)
        # The AR stage must hold the whole grid; vLLM would stop at max_model_len with a short grid.
        limit = self.ar_max_model_len
        if limit is not None and len(prompt["prompt_token_ids"]) + needed > limit:
            raise RequestError(
                f"{resolved.width}x{resolved.height} needs {needed} generated image tokens after a prompt of "
                f"~{len(prompt['prompt_token_ids'])}; the AR stage holds {limit} (its max_model_len): ask for a "
                "smaller size or serve with a larger --max-model-len",
                "size",
            )
        # min_tokens: an end token cannot cut the grids short (diffusers asks for the same count).
        params = VllmSamplingParams(**self.ar_sampling, max_tokens=needed, min_tokens=needed - 1,
                                    seed=resolved.seed % 2**63)
        final = await self._run_ar(prompt, params, f"{rid}:ar")
        tokens = list(final.outputs[0].token_ids)
        preview = needed - 1 - grids.height * grids.width
        image = tokens[preview : preview + grids.height * grids.width]
        if len(image) != grids.height * grids.width:  # ours, not the client's: a 500
            raise RuntimeError(f"{rid}: the AR stage returned {len(tokens)} tokens, {needed} were asked for")
        timings.extra["ar_tokens"] = len(tokens)
        return GlmImagePrior(rid, tuple(image), (grids.height, grids.width))

