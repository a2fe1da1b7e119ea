"""BAGEL's two stages: the AR stage on vLLM's AsyncLLM, the DiT stage behind its engine client.

    text2text / img2text   the AR stage answers; nothing else runs
    text2img               AR prefills the prompt context ([<|im_start|>] prompt
                           [<|im_end|>]) with the OmniKVConnector asking for its KV;
                           the transfer (K/V per layer + keyed metadata, in the KV
                           store) becomes the `cond` branch of a BagelContext as a
                           `BranchRef` (the DiT stage reads it where it runs: its
                           own process, through the store's shm / CUDA IPC); the text-CFG branch is
                           BAGEL's empty context, or a second AR prefill of the
                           negative prompt; the context is the DiT stage's typed
                           input, submitted with the request
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
own output (the connector's kv_transfer_params), and the context carries `<id>`.
The prompts are built from the checkpoint's own tokenizer and config
(`BagelText`, `read_bagel_config`), never from the DiT stage's model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .dit.context import BagelContext, BranchKV, BranchRef
from .dit.weights import BagelText, read_bagel_config
from .dit.encode import BOS, EOI, EOS, SOI, empty_branch, text_block_ids
from ...diffusion.params import ResolvedParams
from ...kv.store import KVHandle, peek_transferred, request_params
from ...orchestrator.stages import StageOrchestrator, StageTimings

__all__ = ["BagelOrchestrator", "StageTimings"]


class BagelOrchestrator(StageOrchestrator):
    """BAGEL's input processor (`bagel_context`): AR prefills -> a BagelContext for the DiT stage."""

    def __init__(self, model: str, *args: Any, **kwargs: Any) -> None:
        #: the hand-over's own view of the checkpoint: its config and tokenizer
        self.bagel_config = read_bagel_config(model)
        self.text = BagelText(model)
        super().__init__(model, *args, **kwargs)

    # the DiT stage loads only what its forward reads; every request brings its context
    pipeline_loader = f"{__package__}.pipeline:load_bagel_pipeline"
    pipeline_kwargs = {"stage_input_required": True}

    dit_parallel = True  # CFG-parallel over dit_options cfg_degree 2|3 (pipeline.BRANCH_RANKS)

    # ---- AR -> DiT ------------------------------------------------------------------
    async def _prefill(self, request_id: str, text: str, timings: StageTimings) -> BranchKV:
        """A text-only context: [<|im_start|>] text [<|im_end|>]."""
        ids = text_block_ids(self.text, text)
        return await self._transfer(request_id, {"prompt_token_ids": ids}, len(ids), 0, timings)

    async def _transfer(self, request_id: str, prompt: dict[str, Any], num_tokens: int, vae_tokens: int,
                        timings: StageTimings) -> BranchRef | BranchKV:
        """Prefill `prompt` on the AR stage; its transferred KV, checked (length, VAE block) from the
        store's header and left in the store for the DiT stage to read where it runs (a `BranchRef`;
        a transfer pulled from another host is in memory already: its `BranchKV`)."""
        from vllm import SamplingParams as VllmSamplingParams

        # One token is the least the engine generates; only the prompt's KV is used.
        params = VllmSamplingParams(max_tokens=1, temperature=0.0,
                                    extra_args={"kv_transfer_params": request_params()})
        final = await self._run_ar(prompt, params, request_id)
        started = time.perf_counter()
        transferred = peek_transferred(final.kv_transfer_params)
        # Hand-over = the producer's gather + store (inside the AR step) + this look at its header
        # (+ the DiT stage's read of it: its output's timings["context_load"], added by the orchestrator).
        timings.transfer += time.perf_counter() - started + transferred.metadata.get("save_seconds", 0.0)
        if isinstance(transferred, KVHandle):
            timings.transferred_bytes += transferred.nbytes
            branch: BranchRef | BranchKV = BranchRef(transferred, transferred.metadata["latent_position"])
        else:
            timings.transferred_bytes += sum(t.numel() * t.element_size()
                                             for t in (*transferred.keys, *transferred.values))
            branch = BranchKV(transferred.keys, transferred.values, transferred.metadata["latent_position"])
        try:
            if transferred.num_tokens != num_tokens:
                raise RuntimeError(f"{request_id}: transferred {transferred.num_tokens} tokens, prompt has {num_tokens}")
            got = transferred.metadata.get("vae_latent_tokens") or []
            if got != ([vae_tokens] if vae_tokens else []):
                raise RuntimeError(f"{request_id}: the AR stage's VAE blocks hold {got} latent tokens, "
                                   f"expected {vae_tokens}")
        except RuntimeError:
            _discard(branch)
            raise
        return branch

    def _img2img_prefills(self, rid: str, resolved: ResolvedParams, timings: StageTimings) -> list:
        """cond / cfg_text / cfg_img of an img2img request, as AR prefills (coroutines)."""
        from PIL import Image

        from .processing import VAE_IMAGE

        # The running engine's own setting (on the server it is vLLM's engine, built from its flags; the AR
        # stage on other hosts, `--omni-stage dit`, has none here: its engine refuses what it does not take).
        vllm_config = getattr(self.ar_engine(), "vllm_config", None)
        if vllm_config is not None and not vllm_config.model_config.multimodal_config.get_limit_per_prompt(VAE_IMAGE):
            raise ValueError(f"img2img needs the AR stage to take {VAE_IMAGE} inputs: set its engine_args "
                             f"limit_mm_per_prompt to include {{{VAE_IMAGE}: 1}} (stage config {self.config.name!r})")
        c = self.bagel_config
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
            n = blocks + (0 if text is None else len(text_block_ids(self.text, text)))
            return self._transfer(f"{rid}:{branch}", {"prompt": prompt, "multi_modal_data": images}, n, vae_tokens, timings)

        return [with_images("cond", resolved.prompt), with_images("cfg_text", resolved.negative_prompt),
                self._prefill(f"{rid}:cfg_img", resolved.prompt, timings)]

    async def hand_over(self, resolved: ResolvedParams, rid: str, timings: StageTimings) -> BagelContext:
        """The one function building the DiT stage's input: AR prefills -> this request's BagelContext."""
        if resolved.images:
            cond, cfg_text, cfg_img = await _all_branches(self._img2img_prefills(rid, resolved, timings))
        else:
            branches = [self._prefill(f"{rid}:cond", resolved.prompt, timings)]
            if resolved.negative_prompt is not None:
                branches.append(self._prefill(f"{rid}:cfg_text", resolved.negative_prompt, timings))
            kvs = await _all_branches(branches)
            cond, cfg_text, cfg_img = kvs[0], kvs[1] if len(kvs) > 1 else empty_branch(self.bagel_config), None
        return BagelContext(rid, cond, cfg_text, cfg_img, resolved.height, resolved.width)


def _discard(branch: Any) -> None:
    if isinstance(branch, BranchRef):
        branch.kv.discard()


async def _all_branches(prefills: list) -> list:
    """The branches' hand-overs; if one fails, the store's copies of the others are freed first."""
    results = await asyncio.gather(*prefills, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for r in results:
            _discard(r)
        raise failed[0]
    return results
