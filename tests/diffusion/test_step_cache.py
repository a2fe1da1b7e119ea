"""Step caching (first-block cache per request and CFG branch) and the DiT options' disabled paths.

Random tiny weights change the first block's residual by ~1.2 (relative L1)
from step to step, so realistic thresholds (~0.1) never skip here: the tests use
0 (never skips), 10 (skips every step after the first) and check the mechanics,
not image quality.
"""

from __future__ import annotations

import pytest
import torch

from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams, load_pipeline, step_cache
from vllm_omni_plugin.diffusion.acceleration import DitOptions
from vllm_omni_plugin.diffusion.fp8 import fp8_linear, move_biases_after_gemm, quantize_fp8
from vllm_omni_plugin.diffusion.workers import PipelineBuilder, launch_engine
from vllm_omni_plugin.request import RequestError, build_sampling_params


def req(seed=3, prompt="a red cat", steps=4, **kw):
    return SamplingParams(prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=96,
                          num_inference_steps=steps, seed=seed, output_type="latent", **kw)


@pytest.fixture()
def fresh(checkpoint):
    """A pipeline of its own: the cache installs its block list into the transformer."""
    return load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")


def test_unset_threshold_leaves_the_transformer_untouched(fresh):
    fresh.generate(req())
    assert type(fresh.pipe.transformer.transformer_blocks) is torch.nn.ModuleList


def test_threshold_zero_equals_no_caching_bit_for_bit(fresh):
    plain = fresh.generate(req()).latents
    zero = fresh.generate(req(cache_threshold=0.0)).latents
    blocks = fresh.pipe.transformer.transformer_blocks
    assert isinstance(blocks, step_cache.CachedBlockList)
    assert torch.equal(plain, zero)
    assert blocks.skipped == 0 and blocks.computed == 2 * 4  # cond + uncond, every step
    assert torch.equal(fresh.generate(req()).latents, plain)  # installed but unused: still the plain path


def test_high_threshold_skips_every_later_step_and_changes_the_result(fresh):
    plain = fresh.generate(req()).latents
    cached = fresh.generate(req(cache_threshold=10.0)).latents
    blocks = fresh.pipe.transformer.transformer_blocks
    assert (blocks.skipped, blocks.computed) == (2 * 3, 2 * 1)  # step 0 computes, steps 1-3 reuse
    assert (cached - plain).abs().max().item() > 1e-3


def test_cached_and_uncached_requests_share_forwards(fresh):
    """Per-row skipping inside one forward: each request ends as it does alone."""
    alone = {"plain": fresh.generate(req(seed=1)).latents,
             "cached": fresh.generate(req(seed=2, prompt="a dog", cache_threshold=10.0)).latents}
    engine = DiffusionEngine(fresh)
    engine.add_request("plain", req(seed=1))
    engine.add_request("cached", req(seed=2, prompt="a dog", cache_threshold=10.0))
    final = engine.run()
    assert engine.stats.batch_sizes == [2, 2, 2, 2]
    for rid, latents in alone.items():
        # a shared forward has another GEMM batch size and padded text: float rounding only
        assert (final[rid].output.latents - latents).abs().max().item() < 1e-4, rid


def test_cache_threshold_validation_and_request_field(pipeline):
    pipe = pipeline("qwen-image")
    assert pipe.resolve(req(cache_threshold=0.1)).cache_threshold == 0.1
    assert pipe.resolve(req(), {"cache_threshold": 0.2}).cache_threshold == 0.2  # stage default
    assert pipe.resolve(req(cache_threshold=0.1), {"cache_threshold": 0.2}).cache_threshold == 0.1
    assert pipe.resolve(req()).cache_threshold is None
    for bad in (-0.1, float("inf"), True):
        with pytest.raises(ValueError, match="cache_threshold"):
            pipe.resolve(req(cache_threshold=bad))
    with pytest.raises(ValueError, match="does not support step caching"):
        pipeline("qwen-image", generic=True).resolve(req(cache_threshold=0.1))
    params, _, _ = build_sampling_params({"prompt": "p", "cache_threshold": "0.25"})
    assert params.cache_threshold == 0.25
    with pytest.raises(RequestError):
        build_sampling_params({"prompt": "p", "cache_threshold": "lots"})


def test_default_dit_options_are_the_plain_engine(checkpoint, pipeline):
    engine = launch_engine(PipelineBuilder(str(checkpoint("qwen-image")), torch.float32), device="cpu",
                           options=DitOptions())
    assert engine.pipeline.parallel is None
    out = engine.pipeline.generate(req()).latents
    assert torch.equal(out, pipeline("qwen-image").generate(req()).latents)


def test_fp8_is_refused_without_an_fp8_gpu(checkpoint):
    pipe = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        quantize_fp8(pipe.pipe.transformer)
    with pytest.raises(ValueError, match="compute capability"):
        launch_engine(PipelineBuilder(str(checkpoint("qwen-image")), torch.float32), device="cpu",
                      options=DitOptions(quantization="fp8"))


def test_fp8_bias_moved_after_the_gemm_keeps_the_transformer_output(checkpoint):
    """quantize_fp8 takes the biases out of the fp8 GEMMs (cuBLASLt refused row-wise fp8 with a fused
    bias on the H200); the bias added afterwards must leave the model's function unchanged."""
    pipe = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")
    plain = pipe.generate(req(steps=2)).latents
    dit = pipe.pipe.transformer
    names = [name for name, m in dit.named_modules() if fp8_linear(m, name)]
    with_bias = [n for n in names if dit.get_submodule(n).bias is not None]
    assert with_bias  # the block linears of Qwen-Image carry biases
    move_biases_after_gemm(dit, names)
    for name in with_bias:
        assert dit.get_submodule(name).linear.bias is None and dit.get_submodule(name).bias is not None
    moved = pipe.generate(req(steps=2)).latents
    assert torch.allclose(moved, plain, atol=1e-5, rtol=0), (moved - plain).abs().max()
