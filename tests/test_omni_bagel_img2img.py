"""img2img contexts prefilled by the AR stage (OmniBagel on the real vLLM CPU engine).

One img2img request is three AR prefills (cond / cfg_text / cfg_img). Each one's
transferred K/V, as a `BranchKV`, must equal the diffusion stage's own
vLLM-free prefill (`encode_context`) of the same branch: VAE block through the
MoT generation expert, ViT block, text, BAGEL's positions. Both float32; 1e-4
as test_kv_connector's text2img check (kernel differences are ~1e-6; a wrong
expert, position or mask gives O(1e-2..1)).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vllm_omni_plugin.kv.store import request_params, take_transferred

pytestmark = pytest.mark.engine

VAE_BLOCK = "<|vision_start|><|vision_pad|><|vision_end|>"
VIT_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def _params():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kv_transfer_params": request_params()})


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _branches(prompt: str, image: Image.Image) -> dict[str, dict]:
    """The three AR prompts of one img2img request (what the orchestrator sends): the edit image
    at the output size for the VAE, and resized to the ViT's square input (56 px in the tiny
    checkpoint) the way encode_context does, so the HF processor's own resize is a no-op."""
    text = f"<|im_start|>{prompt}<|im_end|>"
    both = {"vae_image": image, "image": image.convert("RGB").resize((56, 56), Image.BICUBIC)}
    return {
        "cond": {"prompt": VAE_BLOCK + VIT_BLOCK + text, "multi_modal_data": both},
        "cfg_text": {"prompt": VAE_BLOCK + VIT_BLOCK, "multi_modal_data": both},
        "cfg_img": {"prompt": text},
    }


def _run(llm, requests):
    engine = llm.llm_engine
    for req_id, prompt in requests:
        engine.add_request(req_id, prompt, _params())
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


def _assert_branch(got, expected, what: str) -> None:
    """Equal lengths and latent positions; K/V of every row within 1e-4."""
    assert (got.num_tokens, got.latent_position) == (expected.num_tokens, expected.latent_position), what
    for layer in range(expected.num_layers):
        torch.testing.assert_close(got.keys[layer], expected.keys[layer], rtol=1e-4, atol=1e-4, msg=f"{what} K{layer}")
        torch.testing.assert_close(got.values[layer], expected.values[layer], rtol=1e-4, atol=1e-4, msg=f"{what} V{layer}")


def test_img2img_branches_equal_encode_context(bagel_img2img_llm, checkpoint):
    """All three branches, every row: the VAE block (generation expert, one position,
    bidirectional), the ViT block after it (which sees the VAE block; the VAE block does not see
    it), the text; lengths, latent positions and metadata."""
    from vllm_omni_plugin.families.bagel.dit import BranchKV, encode_context, load_bagel_model

    llm, _ = bagel_img2img_llm
    model = load_bagel_model(checkpoint("bagel"))
    # Two requests with different output sizes in one engine batch, each with its own metadata.
    cases = {"a": ("a red cat on a chair", _image(64, 48, 1)), "b": ("make it blue", _image(32, 64, 2))}
    requests = [(f"{rid}:{name}", p) for rid, (prompt, img) in cases.items() for name, p in _branches(prompt, img).items()]
    outs = _run(llm, requests)
    assert len(outs) == 6
    for rid, (prompt, img) in cases.items():
        expected = encode_context(model, rid, prompt, image=img, height=img.size[1], width=img.size[0])
        for name in ("cond", "cfg_text", "cfg_img"):
            out = outs[f"{rid}:{name}"]
            t = take_transferred(out.kv_transfer_params)
            latent_tokens = (img.size[0] // 16) * (img.size[1] // 16)
            assert t.metadata["vae_latent_tokens"] == ([] if name == "cfg_img" else [latent_tokens])
            assert t.metadata["image_shapes"] == ([] if name == "cfg_img" else [[56, 56]])
            _assert_branch(BranchKV(t.keys, t.values, t.metadata["latent_position"]), getattr(expected, name), f"{rid}:{name}")
