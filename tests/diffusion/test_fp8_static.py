"""fp8_static (diffusion/fp8.py): calibration observer, scale rule, layer choice, determinism, and the
quantized tiny Qwen-Image against the unquantized one on CPU (torch's CPU `_scaled_mm` runs the
float8 GEMM; torchao's static config is the product path, no emulation).

What only the GPU verifies: speed, the CUDA float8 kernels (cuBLASLt / CUTLASS) and their numerics at
real dims, the Triton kernels inductor generates around them (benchmarks/bench_dit_scaling.py
--suite single --only fp8 fp8_static).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_omni_plugin.diffusion import SamplingParams, load_pipeline
from vllm_omni_plugin.diffusion.acceleration import DitOptions, compile_dit
from vllm_omni_plugin.diffusion.fp8 import (CALIBRATION_MARGIN, CALIBRATION_STEPS, FP8_MAX, calibrate,
                                            calibration_request, fp8_linear,
                                            quantize_fp8_static, static_fp8_linear, static_scales)
from vllm_omni_plugin.diffusion.workers import PipelineBuilder, launch_engine

# scripts/setup_env.sh installs torchao beside the venv (it says why); where that folder exists the
# import must work (no silent skip in CI).
TORCHAO_SITE = Path(sys.prefix) / "torchao-site"
if TORCHAO_SITE.is_dir():
    sys.path.insert(0, str(TORCHAO_SITE))
    import torchao  # noqa: E402
else:
    torchao = pytest.importorskip("torchao", reason="fp8_static is torchao's static float8 config")


def small_calibration(seed: int = 0) -> SamplingParams:
    """The calibration request's shape at 128x128 (the default size costs ~40 s on 2 CPU cores)."""
    return SamplingParams(prompt="a market street at dusk", negative_prompt="blurry", seed=seed, height=128,
                          width=128, num_inference_steps=CALIBRATION_STEPS, output_type="latent")


def req(seed: int = 3, steps: int = 4) -> SamplingParams:
    return SamplingParams(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=96,
                          num_inference_steps=steps, seed=seed, output_type="latent")


def fresh(checkpoint):
    return load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(1.0 / float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_calibration_request_is_fixed_text_only_and_spans_the_schedule(checkpoint):
    pipe = fresh(checkpoint)
    r = pipe.resolve(calibration_request(pipe))
    default = pipe.resolve(SamplingParams(prompt="x"))
    assert (r.height, r.width) == (default.height, default.width)  # the pipeline's default size
    assert r.seed == 0 and r.num_inference_steps == CALIBRATION_STEPS and r.negative_prompt  # CFG's uncond rows too
    assert calibration_request(pipe) == calibration_request(fresh(checkpoint))
    edit = load_pipeline(checkpoint("qwen-image-edit"), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="text-only request.*needs input images"):
        calibration_request(edit)


def test_observer_takes_the_max_over_every_call_of_every_step(checkpoint):
    """calibrate's amax per Linear == the max of per-step maxima recorded by an independent hook
    while the same request runs step by step; it is more than the first step alone shows."""
    pipe = fresh(checkpoint)
    dit = pipe.pipe.transformer
    (amax,) = calibrate(pipe, [dit], small_calibration())
    chosen = {n for n, m in dit.named_modules() if static_fp8_linear(m, n)}
    assert set(amax) == chosen

    per_step: list[dict[str, float]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: per_step[-1].__setitem__(
        n, max(per_step[-1].get(n, 0.0), float(args[0].abs().max())))) for n, m in dit.named_modules() if n in chosen]
    state = pipe.prepare(pipe.resolve(small_calibration()), "steps")
    with torch.no_grad():
        while not state.done:
            per_step.append({})
            pipe.scheduler_step([state], pipe.denoise_step([state]))
    for h in hooks:
        h.remove()
    assert len(per_step) == CALIBRATION_STEPS
    for name in chosen:
        assert float(amax[name]) == max(step[name] for step in per_step), name
        assert amax[name].shape == (1,) * amax[name].ndim and amax[name].dtype == torch.float32
    assert any(float(amax[n]) > per_step[0][n] for n in chosen)  # later steps widen the range


def test_layer_choice_blocks_only(checkpoint):
    dit = fresh(checkpoint).pipe.transformer
    linears = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = {n for n, m in dit.named_modules() if static_fp8_linear(m, n)}
    assert chosen and all(n.startswith("transformer_blocks.") for n in chosen)
    assert {"img_in", "txt_in", "proj_out"} <= linears - chosen  # embedders and the output projection stay
    # torchao 0.18 asserts on per-tensor 128x128 weights (fp8.static_fp8_linear): the tiny attention projections
    skipped = {n for n, m in dit.named_modules() if fp8_linear(m, n)} - chosen
    assert skipped and all(tuple(dit.get_submodule(n).weight.shape) == (128, 128) for n in skipped)


def test_scale_rule():
    amax = {"a": torch.tensor([[[224.0]]]), "zero": torch.zeros(1, 1)}
    s = static_scales(amax)
    assert float(s["a"]) == 224.0 * CALIBRATION_MARGIN / FP8_MAX == 1.0 and s["a"].shape == (1, 1, 1)
    assert float(s["zero"]) > 0  # floored: an all-zero input cannot divide by zero
    assert FP8_MAX == 448.0


def test_calibration_is_deterministic_across_loads(checkpoint):
    """Same checkpoint + the same seeded request -> bit-identical scales; another seed -> other scales."""
    one, two = fresh(checkpoint), fresh(checkpoint)
    (x,) = calibrate(one, [one.pipe.transformer], small_calibration())
    (y,) = calibrate(two, [two.pipe.transformer], small_calibration())
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    (z,) = calibrate(two, [two.pipe.transformer], small_calibration(seed=1))
    assert any(not torch.equal(x[n], z[n]) for n in x)


def test_quantized_transformer_stays_close_to_float32(checkpoint):
    """The converted Linears carry torchao float8 weights and the calibrated scales; the tiny pipeline's
    latents and decoded images stay close to the float32 ones on the same seed (4 steps); compiled, close to
    the eager float8 run (~80 s of inductor compile on 2 CPU cores)."""
    pipe = fresh(checkpoint)
    dit = pipe.pipe.transformer
    plain = pipe.generate(req()).latents
    (amax,) = calibrate(pipe, [dit], small_calibration())
    scales = static_scales(amax)
    assert quantize_fp8_static(dit, scales) == len(scales) > 0
    for name, scale in scales.items():
        weight = dit.get_submodule(name).weight
        assert weight.qdata.dtype == torch.float8_e4m3fn
        assert torch.equal(weight.act_quant_scale, scale)
    quant = pipe.generate(req()).latents
    assert not torch.equal(quant, plain)  # the float8 GEMMs ran
    err = float((quant - plain).abs().max())
    assert err < 0.1 * float(plain.abs().max()), err
    p = pipe.resolve(SamplingParams(height=64, width=96, num_inference_steps=1, output_type="np"))
    with torch.no_grad():
        a, b = np.stack(pipe.decode_latents(quant, p)), np.stack(pipe.decode_latents(plain, p))
    print(f"fp8_static vs float32, tiny Qwen-Image: max latent err {err:.4g}, PSNR {psnr(a, b):.2f} dB")
    assert psnr(a, b) > 30, psnr(a, b)
    # Regional compile as the GPU runs it (fullgraph: a graph break in torchao's tensor subclass would
    # raise): dynamo traces the float8 weights, and the fused kernels stay close to the eager float8 run.
    compile_dit(dit, "regional")
    compiled = pipe.generate(req()).latents
    assert float((compiled - quant).abs().max()) < 0.02, float((compiled - quant).abs().max())


def test_engine_option_calibrates_at_load_and_is_reproducible(checkpoint):
    """DitOptions(quantization="fp8_static") through launch_engine (what Omni and `vllm serve --omni` build):
    calibrated at load (on calibration_request, whose fixed content and whose determinism the tests above
    check), so a request gives the same bytes whatever ran before it on that server."""
    engine = launch_engine(PipelineBuilder(str(checkpoint("qwen-image")), torch.float32), device="cpu",
                           options=DitOptions(quantization="fp8_static"))
    dit = engine.pipeline.pipe.transformer
    chosen = [n for n, m in dit.named_modules() if static_fp8_linear(m, n)]
    assert chosen and all(dit.get_submodule(n).weight.qdata.dtype == torch.float8_e4m3fn for n in chosen)
    first = engine.pipeline.generate(req()).latents
    engine.pipeline.generate(req(seed=9, steps=2))
    assert torch.equal(engine.pipeline.generate(req()).latents, first)


def test_benchmark_smoke(tmp_path):
    """bench_dit_scaling.py's fp8 forms on CPU (the GPU command is in benchmarks/README.md): dynamic fp8 is
    skipped with its reason, fp8_static runs and reports its step ratio, max latent error and PSNR next to
    bf16 on the same seed, and the table comes last."""
    import json
    import os
    import subprocess

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dit_scaling.py"
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TORCHAO_SITE), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(bench), "--suite", "single", "--preset", "tiny", "--device", "cpu",
                          "--eager", "--size", "64", "--steps", "2", "--only", "fp8", "fp8_static", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert results["fp8"]["result"] == "SKIPPED" and "CUDA GPU" in results["fp8"]["note"]
    assert not any(r["result"] == "FAILED" for r in results.values()), results
    step = results["64px DiT step (CFG), fp8_static"]
    request = results["64px 2 steps, fp8_static, 1 GPU"]
    assert step["ratio_vs_bf16"] > 0 and step["step_ms"] > 0
    # float8 weights and activations on the tiny DiT: close to bf16, not equal to it
    assert 0 < request["max_latent_err"] < 1 and 30 < request["psnr_db"] < 100
    assert run.stdout.strip().splitlines()[-1].startswith("| 64px 2 steps, fp8_static")
