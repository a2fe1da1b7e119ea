"""Property-based oracles: our step-wise pipelines == diffusers' own, over widely sampled inputs.

tests/diffusion/test_oracle.py pins single cases; these draw them (hypothesis): seeds,
sizes the family allows, prompts with and without quoted text and non-ASCII, and
two checkpoints (factory seeds 0 and 1), at the settings a user gets (batch_cfg on:
cond and uncond in one forward, one level of tolerance, as test_oracle.py states)
and at the pinned dtype float32 with batch_cfg off (diffusers' exact forwards:
bit-identical). Cost is bounded: pipelines are loaded once per (family, checkpoint)
and reused across examples; steps stay at 2 (each step is the same code path; the
number of steps is a loop count, pinned by test_oracle.py at 3-4).

Families: Qwen-Image, Wan2.2 T2V, FLUX.1-dev. Examples per test: `EXAMPLES` (6). Measured on
the shared 2-core CPU under a load average of ~19 (2026-12-02): Qwen-Image and Wan2.2
175-290 s per test, FLUX 30-83 s, both checkpoints' loads included; an idle machine is
several times faster. Adding a family = one entry in `FAMILIES`: how to draw its request and
where its pixels are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.diffusion import SamplingParams, load_pipeline

EXAMPLES = 6
CHECKPOINT_SEEDS = (0, 1)

_WORDS = ["a red cat", "two dogs on a beach", "a lighthouse at night", "an old car", "fresh bread"]
_QUOTED = ['', ' with a sign that says "OPEN"', " reading \u201cCAF\u00c9 24h\u201d", ' labelled "42"']
_NON_ASCII = ["", " \u732b\u3068\u72ac", " in M\u00fcnchen", " \u041f\u0440\u0438\u0432\u0435\u0442", " \U0001f3a8"]
prompts = st.builds(lambda w, q, n: w + q + n, st.sampled_from(_WORDS), st.sampled_from(_QUOTED),
                    st.sampled_from(_NON_ASCII))
seeds = st.integers(0, 2**31 - 1)


@dataclass(frozen=True)
class Family:
    """How to draw one request of a family and read its pixels from ours and from diffusers."""

    name: str  # the checkpoint factory's family name
    request: Callable[[Any], dict[str, Any]]  # hypothesis `draw` -> request fields (diffusers' kwargs too)
    ours: Callable[[Any], np.ndarray]  # our DiffusionOutput -> pixels
    reference: Callable[[Any], np.ndarray]  # diffusers' output -> pixels


def _qwen_request(draw) -> dict[str, Any]:
    # Qwen-Image's VAE (x8) and 2x2 patches: sides are multiples of 16.
    h, w = draw(st.sampled_from([32, 48, 64, 96])), draw(st.sampled_from([32, 48, 64, 96]))
    negative = draw(st.sampled_from([None, "blurry", "\u6a21\u7cca"]))  # None: no CFG
    return dict(prompt=draw(prompts), negative_prompt=negative, height=h, width=w, num_inference_steps=2,
                true_cfg_scale=draw(st.sampled_from([1.0, 4.0])))


def _wan_request(draw) -> dict[str, Any]:
    # Wan2.2's VAE: x8 spatially (x16 with its 2x2 patches), frames 4k + 1.
    return dict(prompt=draw(prompts), negative_prompt=draw(st.sampled_from(["static", "\u9759\u6b62"])),
                height=draw(st.sampled_from([32, 48])), width=draw(st.sampled_from([32, 48])),
                num_frames=draw(st.sampled_from([1, 5])), num_inference_steps=2,
                guidance_scale=draw(st.sampled_from([1.0, 4.0])), guidance_scale_2=draw(st.sampled_from([1.0, 3.0])))


def _flux_request(draw) -> dict[str, Any]:
    # FLUX.1-dev: VAE x8 with 2x2 packed latents: sides are multiples of 16; guidance-distilled (no true CFG
    # without a negative prompt); a short T5 length keeps the CPU cost down (512 is pinned by test_flux.py).
    return dict(prompt=draw(prompts), height=draw(st.sampled_from([32, 48, 64])), width=draw(st.sampled_from([32, 48])),
                num_inference_steps=2, guidance_scale=draw(st.sampled_from([1.0, 3.5, 5.0])), max_sequence_length=32)


FAMILIES = {
    "qwen-image": Family("qwen-image", _qwen_request, lambda out: np.stack(out.images), lambda ref: ref.images),
    "wan2.2-t2v": Family("wan2.2-t2v", _wan_request, lambda out: np.asarray(out.videos), lambda ref: ref.frames),
    "flux": Family("flux", _flux_request, lambda out: np.stack(out.images), lambda ref: ref.images),
}


@pytest.fixture(scope="module")
def pipelines(checkpoint):
    """`pipelines(family, checkpoint_seed, batch_cfg)`: loaded once, shared by every example."""
    loaded: dict[tuple[str, int, bool], Any] = {}

    def get(family: str, ckpt_seed: int, batch_cfg: bool):
        key = (family, ckpt_seed, batch_cfg)
        if key not in loaded:
            base = next((p for (f, s, _), p in loaded.items() if (f, s) == (family, ckpt_seed)), None)
            if base is None:
                loaded[key] = load_pipeline(checkpoint(family, seed=ckpt_seed), dtype=torch.float32, device="cpu",
                                            batch_cfg=batch_cfg)
            else:
                from vllm_omni_plugin.diffusion.pipelines import wrap

                loaded[key] = wrap(base.pipe, model_id=base.model_id, batch_cfg=batch_cfg)
        return loaded[key]

    return get


def _check(pipelines, family: Family, draw, batch_cfg: bool, tol: int) -> None:
    kw, seed, ckpt_seed = family.request(draw), draw(seeds), draw(st.sampled_from(CHECKPOINT_SEEDS))
    ours = pipelines(family.name, ckpt_seed, batch_cfg)
    ref_kw = {k: v for k, v in kw.items() if v is not None}
    ref = ours.pipe(**ref_kw, generator=seeded(seed), output_type="np")
    out = ours.generate(SamplingParams(**kw, seed=seed, output_type="np"))
    assert_pixels_close(family.ours(out), family.reference(ref), tol)


_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@_SETTINGS
@given(data=st.data())
def test_default_settings_match_diffusers(pipelines, family, data):
    """What a user runs (batch_cfg on, float32 on CPU): within one level of diffusers' pipeline."""
    _check(pipelines, FAMILIES[family], data.draw, batch_cfg=True, tol=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@_SETTINGS
@given(data=st.data())
def test_pinned_dtype_and_forwards_match_diffusers_exactly(pipelines, family, data):
    """float32 and diffusers' own forwards (batch_cfg off): bit-identical pixels."""
    _check(pipelines, FAMILIES[family], data.draw, batch_cfg=False, tol=0)
