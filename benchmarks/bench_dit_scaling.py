"""Multi-GPU DiT, fp8, step caching and per-step host overhead on the full Qwen-Image.

The full pipeline (20.4B DiT, Qwen2.5-VL-7B text encoder, VAE) is built in memory
with random weights (checkpoint factory, `full` preset), bf16, on each GPU used.
Needs torch + diffusers (+ torchao for fp8); no vLLM. One `--suite` per invocation,
each sized to finish within ~9 minutes on 2x H200 (README_gpu_perf.txt):

  single    one GPU: 1024x1024 50 steps ours vs diffusers + compile (the same
            compiled transformer); 8 concurrent 512x512 (20 steps): ours vs diffusers
            one by one and diffusers' batched prompt-list call; fp8 in two forms
            (torchao dynamic per-row "fp8", calibrated static per-tensor "fp8_static"):
            DiT step time, ratio to bf16 and the N-step result's deviation from bf16 (max
            latent error, PSNR of decoded images; a second DiT with the same seeded weights
            is quantized; each form under --fp8-limit-s, printing every phase and DiT
            forward; "fp8" is skipped on CPU, "fp8_static" runs there); step caching at --cache-thresholds (speed, skipped
            branch-forwards, deviation); host overhead of one 512x512 step
  multi     two GPUs: CFG-parallel 1024x1024 50 steps against one GPU in the same
            launch (rank 0's pipeline doubles as the 1-GPU pipeline) and 8x512x512
            (its 1-GPU figure is `single`'s)
  sp        two GPUs: Ulysses sequence-parallel 2048x2048 (10 steps, eager unless
            --sp-compile) against one GPU, in a process of its own (a second NCCL
            engine in one process after the first closed died with a segfault)
  overhead  one 512x512 step: wall vs GPU-busy time, regional compile with and
            without dynamo's guard evaluation
  probe     which torch._scaled_mm fp8 forms this torch + CUDA accept

Every variant runs in its own try/except with a time limit (--variant-limit-s);
a failed or timed-out variant prints its error and the table is printed at the end
anyway. Results also go to --out as JSON after every measurement.

    python benchmarks/bench_dit_scaling.py --suite multi --out multi.json
    python benchmarks/bench_dit_scaling.py --suite multi --preset tiny --device cpu --eager \
        --size 64 --steps 4 --tp-steps 3 --concurrency 3   # smoke test (gloo)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_qwen_image import CFG, NEGATIVE, PROMPTS  # noqa: E402
from vllm_omni_plugin.families.qwen_image.checkpoint import build_in_memory  # noqa: E402
from vllm_omni_plugin.diffusion import DiffusionEngine, EngineConfig, SamplingParams, step_cache  # noqa: E402
from vllm_omni_plugin.diffusion.acceleration import DitOptions, compile_dit  # noqa: E402
from vllm_omni_plugin.diffusion.fp8 import calibrate_and_quantize_fp8_static, quantize_fp8  # noqa: E402
from vllm_omni_plugin.diffusion.parallel import ParallelConfig  # noqa: E402
from vllm_omni_plugin.families.qwen_image.pipeline import QwenImageStepwise  # noqa: E402
from vllm_omni_plugin.diffusion.workers import launch_engine  # noqa: E402

CACHE_THRESHOLDS = (0.0, 0.12, 1.0)


@dataclass(frozen=True)
class BenchBuilder:
    """Picklable `build(device)` for every rank: the same seeded random weights on each device."""

    preset: str
    compiled: bool

    def __call__(self, device: torch.device) -> QwenImageStepwise:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = build_in_memory("qwen-image", self.preset, seed=0, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        if self.compiled:
            compile_dit(pipe.transformer, "regional")
        return QwenImageStepwise(pipe, model_id=f"qwen-image-{self.preset}")


class Progress:
    """Prints a variant's phases and every DiT forward (one per CFG step) with the seconds since it began."""

    def __init__(self, name: str) -> None:
        self.name, self.t0, self.forwards = name, time.perf_counter(), 0

    def __call__(self, what: str) -> None:
        print(f"    [{self.name} +{time.perf_counter() - self.t0:.1f} s] {what}", flush=True)

    def forward(self) -> None:
        self.forwards += 1
        self(f"DiT forward {self.forwards}")


class VariantTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise VariantTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    def expire(signum, frame):
        raise VariantTimeout(f"variant exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.rows: list[tuple[str, str, str]] = []  # (variant, result, note)
        self.results: dict[str, dict] = {}
        self.t_start = time.perf_counter()
        self.builder = BenchBuilder(args.preset, compiled=not args.eager)
        self.ours: QwenImageStepwise | None = None
        self.reference: dict[str, torch.Tensor] = {}  # latents of the 1-GPU runs, by variant key
        self.live_engines: list = []
        self.t1: dict[str, float] = {}  # 1-GPU timings the parallel variants are compared with  # parallel engines whose workers the watchdog must stop

    def watchdog(self) -> None:
        """Last resort for a hang inside a collective or a CUDA wait (no Python signal gets through
        there): print the table, stop the worker ranks and exit."""
        print(f"\nWATCHDOG: suite still running after {self.args.budget_s + 60:.0f} s; aborting", flush=True)
        self.record("watchdog", "ABORTED", "hung (collective or CUDA wait); results above are valid")
        self.table()
        for engine in self.live_engines:
            for proc in engine.workers:
                proc.kill()
        os._exit(3)

    # ---- plumbing ----------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int = 1):
        """(median seconds, last result) over `repeats` synchronized runs."""
        times, out = [], None
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def record(self, variant: str, result: str, note: str = "", **values) -> None:
        self.rows.append((variant, result, note))
        self.results[variant] = {"result": result, "note": note, **values}
        print(f"[{time.strftime('%H:%M:%S')}] {variant}: {result} {note} {values}", flush=True)
        if self.args.out:
            Path(self.args.out).write_text(json.dumps({"meta": self.meta(), "results": self.results}, indent=1))

    def meta(self) -> dict:
        return {
            "suite": self.args.suite,
            "preset": self.args.preset,
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "gpus": torch.cuda.device_count() if self.device.type == "cuda" else 0,
            "torch": torch.__version__,
            "compiled": not self.args.eager,
            "elapsed_s": round(time.perf_counter() - self.t_start, 1),
        }

    def variant(self, name: str, fn, limit: float | None = None) -> None:
        """Run one variant: errors and timeouts are recorded, the suite goes on."""
        if self.args.only and name not in self.args.only:
            return
        left = self.args.budget_s - (time.perf_counter() - self.t_start)
        if left < 20:
            self.record(name, "SKIPPED", "suite time budget spent")
            return
        limit = min(limit or self.args.variant_limit_s, left)
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                fn()
        except Exception as exc:  # noqa: BLE001 -- a failed variant is reported; the table still comes
            traceback.print_exc()
            self.record(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:160]}")
        print(f"    ({name}: {time.perf_counter() - t0:.1f} s with warm-up)", flush=True)

    def params(self, size: int, steps: int, prompt: int = 0, seed: int = 0, **kw) -> SamplingParams:
        return SamplingParams(prompt=PROMPTS[prompt % len(PROMPTS)], negative_prompt=NEGATIVE, true_cfg_scale=CFG,
                              height=size, width=size, num_inference_steps=steps, seed=seed, output_type="latent",
                              **kw)

    def pipeline(self) -> QwenImageStepwise:
        if self.ours is None:
            t0 = time.perf_counter()
            self.ours = self.builder(torch.device(self.args.device, 0) if self.device.type == "cuda" else self.device)
            self.sync()
            self.record("build (1 GPU)", f"{time.perf_counter() - t0:.1f} s")
        return self.ours

    def run_engine(self, engine: DiffusionEngine, requests: list[SamplingParams]) -> list[torch.Tensor]:
        """Submit all, step to the end; latents in submission order (raises on a failed request)."""
        if isinstance(self.ours, QwenImageStepwise):
            self.ours.clear_prompt_cache()  # prompts are encoded inside the timing, as diffusers does
        ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(requests))]
        for rid, p in zip(ids, requests):
            engine.add_request(rid, p)
        final = engine.run()
        bad = [final[r] for r in ids if final[r].kind != "finished"]
        if bad:
            raise RuntimeError(f"request {bad[0].request_id} ended {bad[0].kind}") from bad[0].error
        return [final[r].output.latents for r in ids]

    def deviation(self, latents: torch.Tensor, ref: torch.Tensor, size: int) -> dict:
        """max |latent error| and PSNR of the decoded images against the reference run."""
        ours = self.pipeline()
        out = {"max_latent_err": float((latents.float().to(ref.device) - ref.float()).abs().max())}
        p = ours.resolve(SamplingParams(height=size, width=size, num_inference_steps=1, output_type="np"))
        try:
            with torch.no_grad():
                a = np.stack(ours.decode_latents(latents.to(ref.device), p))
                b = np.stack(ours.decode_latents(ref, p))
            out["psnr_db"] = round(psnr(a, b), 2)
        except torch.OutOfMemoryError:  # a 2048^2 VAE decode next to two pipelines: keep the timing
            out["psnr_db"] = "n/a (VAE decode out of memory)"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    # ---- parts -------------------------------------------------------------------
    def e2e_1gpu(self, size: int, steps: int, key: str, **kw) -> float:
        ours = self.pipeline()
        engine = DiffusionEngine(ours)
        self.run_engine(engine, [self.params(size, 2, **kw)])  # compile / warm up this shape
        t, (lat,) = self.timed(lambda: self.run_engine(engine, [self.params(size, steps, **kw)]))
        self.reference[key] = lat
        return t

    def step_ms(self, size: int) -> float:
        """One engine step (true CFG) of one request, after warm-up."""
        ours = self.pipeline()
        state = ours.prepare(ours.resolve(self.params(size, 50)), "step")

        def one():
            ours.scheduler_step([state], ours.denoise_step([state]))

        for _ in range(2):
            one()
        t, _ = self.timed(one, repeats=5)
        return t * 1e3

    def tp_requests(self, steps: int) -> list[SamplingParams]:
        return [self.params(512, steps, prompt=i, seed=i) for i in range(self.args.concurrency)]

    def part_1024(self) -> None:
        a = self.args
        self.t1["ours"] = self.e2e_1gpu(a.size, a.steps, "1gpu")
        self.record(f"{a.size}px {a.steps} steps, ours, 1 GPU", f"{self.t1['ours']:.2f} s")

    def part_diffusers_1024(self) -> None:
        a = self.args
        pipe = self.pipeline().pipe

        def call(n_steps):
            return pipe(prompt=PROMPTS[0], negative_prompt=NEGATIVE, true_cfg_scale=CFG, height=a.size, width=a.size,
                        num_inference_steps=n_steps, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(0))

        call(2)
        t, _ = self.timed(lambda: call(a.steps))
        self.record(f"{a.size}px {a.steps} steps, diffusers{'' if a.eager else ' + compile'}, 1 GPU", f"{t:.2f} s")

    def part_batch_1gpu(self) -> None:
        a = self.args
        engine = DiffusionEngine(self.pipeline(), EngineConfig(max_batch_tokens=1 << 20))
        self.run_engine(engine, self.tp_requests(2))
        t, lat = self.timed(lambda: self.run_engine(engine, self.tp_requests(a.tp_steps)))
        self.reference["tp"] = torch.cat(lat)
        self.t1["tp"] = t
        self.record(f"{a.concurrency}x512px {a.tp_steps} steps, ours, 1 GPU", f"{a.concurrency / t:.3f} img/s",
                    f"{t:.2f} s")

    def part_batch_diffusers(self) -> None:
        a = self.args
        pipe = self.pipeline().pipe

        def call(n_steps, prompt):
            n = len(prompt) if isinstance(prompt, list) else 1
            neg = [NEGATIVE] * n if isinstance(prompt, list) else NEGATIVE
            return pipe(prompt=prompt, negative_prompt=neg, true_cfg_scale=CFG, height=512, width=512,
                        num_inference_steps=n_steps, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(0))

        call(2, PROMPTS[0])
        t, _ = self.timed(lambda: call(a.tp_steps, PROMPTS[0]))
        self.record(f"{a.concurrency}x512px, diffusers one by one", f"{1 / t:.3f} img/s",
                    f"{t * a.concurrency:.2f} s (one call x {a.concurrency})")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.concurrency)]
        call(2, prompts)
        t, _ = self.timed(lambda: call(a.tp_steps, prompts))
        self.record(f"{a.concurrency}x512px, diffusers batched prompt list", f"{a.concurrency / t:.3f} img/s",
                    f"{t:.2f} s")

    def part_fp8(self, form: str) -> None:
        """bf16 vs one fp8 form (`form`: "fp8" dynamic row-wise, "fp8_static" calibrated per-tensor) on the
        same weights: a second, seeded-identical DiT is built, quantized (fp8_static: calibrated first, on
        the product's calibration request) and compiled; per-step progress is printed throughout, so a
        stall shows which phase it is in."""
        from vllm_omni_plugin.checkpoints.weights import random_model
        from vllm_omni_plugin.families.qwen_image.checkpoint import TRANSFORMER
        from diffusers import QwenImageTransformer2DModel

        a = self.args
        if form == "fp8" and (self.device.type != "cuda" or torch.cuda.get_device_capability() < (8, 9)):
            self.record(form, "SKIPPED", "dynamic row-wise fp8 needs a CUDA GPU with compute capability >= 8.9")
            return
        if form == "fp8_static" and self.device.type != "cuda":
            print("    (fp8_static on CPU: torch's CPU float8 GEMM; the speed is meaningless, the path is checked)")
        ours = self.pipeline()
        bf16 = ours.pipe.transformer
        if "bf16_ms" not in self.t1:
            self.t1["bf16_ms"] = self.step_ms(a.size)
            self.record(f"{a.size}px DiT step (CFG), bf16", f"{self.t1['bf16_ms']:.1f} ms")
        if "1gpu" not in self.reference:
            self.part_1024()
        phase = Progress(form)
        phase("building a second seeded DiT")
        dit = random_model(lambda: QwenImageTransformer2DModel(**TRANSFORMER[a.preset]), seed=0,
                           component="transformer", dtype=bf16.dtype, device=bf16.device)
        hook = dit.register_forward_pre_hook(lambda m, args: phase.forward())
        ours.pipe.transformer = dit
        try:
            if form == "fp8_static":
                phase("calibrating (the product's calibration request, eager)")
                (n,) = calibrate_and_quantize_fp8_static(ours, [dit])
            else:
                phase("quantizing")
                n = quantize_fp8(dit)
            if not a.eager:
                phase("compiling (on the next forward)")
                compile_dit(dit, "regional")
            phase("step timing")
            ms = self.step_ms(a.size)
            self.record(f"{a.size}px DiT step (CFG), {form}", f"{ms:.1f} ms",
                        f"{self.t1['bf16_ms'] / ms:.2f}x vs bf16; {n} linears", step_ms=ms,
                        ratio_vs_bf16=round(self.t1["bf16_ms"] / ms, 3))
            phase(f"{a.steps}-step request")
            t = self.e2e_1gpu(a.size, a.steps, form)
            dev = self.deviation(self.reference[form], self.reference["1gpu"], a.size)
            speed = f"{self.t1['ours'] / t:.2f}x vs bf16; " if "ours" in self.t1 else ""
            self.record(f"{a.size}px {a.steps} steps, {form}, 1 GPU", f"{t:.2f} s",
                        f"{speed}max latent err {dev['max_latent_err']:.3g}, PSNR {dev['psnr_db']} dB vs bf16", **dev)
        finally:
            hook.remove()
            ours.pipe.transformer = bf16
            del dit

    def part_cache(self, threshold: float) -> None:
        a = self.args
        ours = self.pipeline()
        blocks = step_cache.install(ours.pipe.transformer)
        before = (blocks.skipped, blocks.computed)
        t = self.e2e_1gpu(a.size, a.steps, f"cache{threshold}", cache_threshold=threshold)
        # e2e_1gpu ran a 2-step warm-up too: count only the timed run's 2 x steps branch-forwards
        skipped = blocks.skipped - before[0]
        total = skipped + blocks.computed - before[1]
        lat, ref = self.reference[f"cache{threshold}"], self.reference.get("1gpu")
        dev = self.deviation(lat, ref, a.size) if ref is not None else {}
        exact = "bit-exact; " if ref is not None and torch.equal(lat, ref) else ""
        speed = f"{self.t1['ours'] / t:.2f}x; " if "ours" in self.t1 else ""
        self.record(f"{a.size}px {a.steps} steps, cache_threshold={threshold}", f"{t:.2f} s",
                    f"{speed}{exact}skipped {skipped}/{total} branch-forwards (incl. 2-step warm-up); max latent err "
                    f"{dev.get('max_latent_err', float('nan')):.3g}, PSNR {dev.get('psnr_db', float('nan'))} dB", **dev)

    def part_overhead(self, label: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        ours = self.pipeline()
        state = ours.prepare(ours.resolve(self.params(512, 50)), "overhead")

        def one():
            ours.scheduler_step([state], ours.denoise_step([state]))

        for _ in range(3):
            one()
        wall, _ = self.timed(one, repeats=5)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            one()
            self.sync()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        top = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:8]
        host = {e.key[:60]: round(e.self_cpu_time_total / 1e3, 2) for e in top}
        self.record(f"512px step, {label}", f"{wall * 1e3:.1f} ms wall",
                    f"GPU busy {gpu:.1f} ms -> host overhead ~{wall * 1e3 - gpu:.1f} ms", top_host_ms=host)

    def part_sp_1gpu(self) -> None:
        a = self.args
        with torch.compiler.set_stance("default" if a.sp_compile else "force_eager"):
            self.t1["sp"] = self.e2e_1gpu(a.sp_size, a.sp_steps, "sp")
        self.record(f"{a.sp_size}px {a.sp_steps} steps, ours, 1 GPU{' (eager)' if not a.sp_compile else ''}",
                    f"{self.t1['sp']:.2f} s")

    # ---- multi-GPU ---------------------------------------------------------------
    @contextlib.contextmanager
    def one_device(self):
        """Run the rank-0 pipeline as a plain 1-GPU pipeline meanwhile (the workers wait in their broadcast)."""
        ours = self.pipeline()
        group, ours.parallel = ours.parallel, None
        try:
            yield
        finally:
            ours.parallel = group

    def parallel(self, config: ParallelConfig, label: str, parts: list, eager: bool = False) -> None:
        """Launch a 2-rank engine, run `parts(engine)`, close.

        Rank 0 reuses the 1-GPU pipeline when one exists; otherwise every rank
        builds at once (rank 0's build overlaps the workers') and rank 0's
        pipeline becomes the 1-GPU pipeline of the later variants.
        """
        a = self.args
        box: dict = {}

        def launch():
            t0 = time.perf_counter()
            # compile through DitOptions: it compiles without full graphs under sequence parallelism
            options = DitOptions(parallel=config, compile=None if (a.eager or eager) else "regional")
            box["engine"] = launch_engine(BenchBuilder(a.preset, compiled=False), device=a.device, options=options,
                                          main_pipeline=self.ours)
            self.ours = box["engine"].pipeline
            self.record(f"launch {label} (build on every rank)", f"{time.perf_counter() - t0:.1f} s")

        self.variant(f"launch {label}", launch, limit=a.launch_limit_s)
        if "engine" not in box:
            return
        engine = box["engine"]
        self.live_engines.append(engine)
        failures = sum(r[1] == "FAILED" for r in self.rows)
        try:
            for name, fn in parts:
                self.variant(name, lambda: fn(engine))
        finally:
            # After a failure inside a step the ranks may be out of step: no stop handshake then.
            engine.close(force=sum(r[1] == "FAILED" for r in self.rows) > failures)
            self.live_engines.remove(engine)

    def multi_e2e(self, engine, size: int, steps: int, ref_key: str, t_key: str, label: str) -> None:
        self.run_engine(engine, [self.params(size, 2)])
        t, (lat,) = self.timed(lambda: self.run_engine(engine, [self.params(size, steps)]))
        dev = self.deviation(lat, self.reference[ref_key], size) if ref_key in self.reference else {}
        speed = f"{self.t1[t_key] / t:.2f}x vs 1 GPU; " if t_key in self.t1 else ""
        self.record(f"{size}px {steps} steps, ours, 2 GPUs {label}", f"{t:.2f} s",
                    f"{speed}max latent err {dev.get('max_latent_err', float('nan')):.3g}, "
                    f"PSNR {dev.get('psnr_db', float('nan'))} dB", **dev)

    def multi_batch(self, engine, label: str) -> None:
        a = self.args
        self.run_engine(engine, self.tp_requests(2))
        t, lat = self.timed(lambda: self.run_engine(engine, self.tp_requests(a.tp_steps)))
        ref = self.reference.get("tp")
        err = float((torch.cat(lat).float() - ref.float()).abs().max()) if ref is not None else float("nan")
        speed = f"{self.t1['tp'] / t:.2f}x vs 1 GPU; " if "tp" in self.t1 else ""
        self.record(f"{a.concurrency}x512px {a.tp_steps} steps, ours, 2 GPUs {label}",
                    f"{a.concurrency / t:.3f} img/s", f"{t:.2f} s; {speed}max latent err {err:.3g}")

    # ---- suites ------------------------------------------------------------------
    def suite_single(self) -> None:
        """Everything on one GPU: 1024 ours vs diffusers, 8x512, fp8, step caching, host overhead."""
        self.variant("1 GPU 1024", self.part_1024)
        self.variant("diffusers 1024", self.part_diffusers_1024)
        self.variant("1 GPU 8x512", self.part_batch_1gpu)
        self.variant("diffusers 8x512", self.part_batch_diffusers)
        for form in ("fp8", "fp8_static"):  # each under its own time limit: one stall cannot eat the lease
            self.variant(form, lambda f=form: self.part_fp8(f), limit=self.args.fp8_limit_s)
        for threshold in self.args.cache_thresholds:
            self.variant(f"cache {threshold}", lambda t=threshold: self.part_cache(t))
        self.suite_overhead()

    def suite_multi(self) -> None:
        """2 GPUs: CFG-parallel at 1024 (against 1 GPU in the same launch) and 8x512."""
        a = self.args

        def single(part):
            with self.one_device():
                part()

        # The 8x512 one-GPU figure is the `single` suite's (time: each new shape compiles).
        self.parallel(ParallelConfig(cfg_degree=2), "CFG-parallel", [
            ("1 GPU 1024", lambda e: single(self.part_1024)),
            ("CFG-parallel 1024", lambda e: self.multi_e2e(e, a.size, a.steps, "1gpu", "ours", "CFG-parallel")),
            ("CFG-parallel 8x512", lambda e: self.multi_batch(e, "CFG-parallel")),
        ])
        # Ulysses is the `sp` suite, a process of its own: a second NCCL engine launched in this
        # process after the first one closed died with a segfault on 2x H200 (torch 2.11).

    def suite_sp(self) -> None:
        """Ulysses 2048 against one GPU: the 1-GPU run first on the plain pipeline, which rank 0 of
        the Ulysses engine then reuses (a context-parallel transformer cannot run as one device)."""
        a = self.args
        label = "Ulysses SP" + ("" if a.sp_compile else " (eager)")
        self.variant("1 GPU 2048", self.part_sp_1gpu)

        def sp(engine):
            with torch.compiler.set_stance("default" if a.sp_compile else "force_eager"):
                self.multi_e2e(engine, a.sp_size, a.sp_steps, "sp", "sp", label)

        if a.sp_compile:  # rank 0's blocks were compiled as full graphs for one GPU; SP compiles them without
            torch._dynamo.reset()
        self.parallel(ParallelConfig(ulysses_degree=2), "Ulysses SP", [("Ulysses 2048", sp)], eager=not a.sp_compile)

    def suite_probe(self) -> None:
        """Which fp8 GEMM forms this torch + CUDA accepts (torch._scaled_mm directly)."""
        m, k, n = 256, 3072, 12288
        a = torch.randn(m, k, device=self.device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=self.device).to(torch.float8_e4m3fn).t()
        bias = torch.randn(n, device=self.device, dtype=torch.bfloat16)
        forms = {
            "tensorwise": (torch.ones((), device=self.device), torch.ones((), device=self.device)),
            "rowwise": (torch.ones(m, 1, device=self.device), torch.ones(1, n, device=self.device)),
        }
        for label, (sa, sb) in forms.items():
            for with_bias in (False, True):
                for fast in (False, True):
                    name = f"_scaled_mm {label}{' +bias' if with_bias else ''}{' fast_accum' if fast else ''}"
                    try:
                        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias if with_bias else None,
                                         out_dtype=torch.bfloat16, use_fast_accum=fast)
                        self.sync()
                        self.record(name, "ok")
                    except Exception as exc:  # noqa: BLE001 -- a failing GEMM form is the probe's answer
                        self.record(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:80]}")

    def suite_overhead(self) -> None:
        """Host overhead of one 512x512 step: regional compile, and with dynamo's guard evaluation skipped."""
        self.variant("overhead", lambda: self.part_overhead("regional compile"))

        def skip_guards():
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                self.part_overhead("regional compile, dynamo guard evaluation skipped")

        self.variant("overhead skip guards", skip_guards)

    # ---- output ------------------------------------------------------------------
    def table(self) -> None:
        print(f"\n## suite {self.args.suite} ({self.meta()})\n")
        print("| variant | result | note |")
        print("|---|---|---|")
        for variant, result, note in self.rows:
            print(f"| {variant} | {result} | {note} |")
        sys.stdout.flush()

    def run(self) -> None:
        timer = threading.Timer(self.args.budget_s + 60, self.watchdog)
        timer.daemon = True
        timer.start()
        try:
            getattr(self, f"suite_{self.args.suite}")()
        finally:
            timer.cancel()
            self.table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=sorted(n.removeprefix("suite_") for n in vars(Suite) if n.startswith("suite_")))
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sp-size", type=int, default=2048)
    ap.add_argument("--sp-steps", type=int, default=10)
    ap.add_argument("--sp-compile", action="store_true",
                    help="compile the 2048 runs too (default eager: saves two ~1-minute compiles per run)")
    ap.add_argument("--cache-thresholds", nargs="+", type=float, default=list(CACHE_THRESHOLDS))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tp-steps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=480, help="whole-suite budget; later variants are skipped")
    ap.add_argument("--variant-limit-s", type=float, default=180)
    ap.add_argument("--launch-limit-s", type=float, default=240)
    ap.add_argument("--fp8-limit-s", type=float, default=240,
                    help="time limit of each fp8 variant (build + quantize/calibrate + compile + timing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help="run only these variants of the suite (names as in `variant(...)`, e.g. 'fp8' 'cache 0.12')")
    args = ap.parse_args()
    Suite(args).run()


if __name__ == "__main__":
    main()
