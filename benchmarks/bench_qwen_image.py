"""Qwen-Image on one GPU: diffusers eager, diffusers + torch.compile, our engine.

The FULL Qwen-Image pipeline (20.4B DiT, Qwen2.5-VL-7B text encoder, VAE) is
built in memory with random weights by the checkpoint factory (`full` preset),
in bf16 on the GPU. Needs torch + diffusers + transformers; no vLLM.

Measured (median of timed repeats after warm-up, CUDA-synchronized):
  step        one true-CFG denoising step at 512 and 1024: diffusers' way (two
              forwards, cond then uncond, which is our pipeline with
              batch_cfg=False) vs our engine's step (cond+uncond in one forward)
  e2e         one request end to end, 50 steps, 1024x1024 (and 512x512):
              diffusers `pipe(...)` vs our `generate()`
  throughput  images/s for 1, 4, 8 concurrent 512x512 requests (20 steps):
              diffusers one request at a time; diffusers' own batched call,
              like for like with each of our two request mixes:
                same prompt      N requests with ONE prompt (distinct seeds)
                                 vs `num_images_per_prompt=N`
                distinct prompts N requests with N prompts vs diffusers'
                                 `prompt=[N prompts]` (padded, masked text)
              and our engine batching the N requests' steps. Every timed run
              of ours starts with an empty prompt cache: its prompts are
              encoded inside the timing, as diffusers encodes them.
  prep        admitting N distinct-prompt requests: one text-encoder call for
              all (`prepare_many`) vs one `prepare` per request
  profile     (compiled) ms per engine step of N concurrent requests, same vs
              distinct prompts, and the top CUDA kernels of one step
  graphs      --graph-concurrency (8) concurrent 512x512 distinct-prompt requests
              (20 steps) through our engine with and without whole-transformer
              CUDA graphs (dit_options cuda_graphs), next to diffusers one
              request at a time, in each mode (eager / regional compile); a
              table of these is printed last. On CPU the graph variants are
              skipped with the reason printed (the rest runs as a smoke test).
Each part runs eager, then again after `transformer.compile_repeated_blocks`
(regional torch.compile, shared by diffusers and our engine: same module).
`--parts` takes part names (every mode) or MODE:PART (that mode only).

    python benchmarks/bench_qwen_image.py --out results.json
    python benchmarks/bench_qwen_image.py --preset tiny --device cpu   # smoke test
    python benchmarks/bench_qwen_image.py --parts graphs --out graphs.json  # 8 x 512^2: graphs vs not

A table is printed last; results go to --out as JSON after every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_omni_plugin.families.qwen_image.checkpoint import build_in_memory  # noqa: E402
from vllm_omni_plugin.diffusion import cuda_graphs  # noqa: E402
from vllm_omni_plugin.diffusion.acceleration import graph_dit  # noqa: E402
from vllm_omni_plugin.diffusion import DiffusionEngine, EngineConfig, SamplingParams  # noqa: E402
from vllm_omni_plugin.families.qwen_image.pipeline import QwenImageStepwise  # noqa: E402

PROMPTS = [
    "A cat holding a sign that says hello world, studio photo, soft light",
    "A watercolor painting of a lighthouse on a cliff at dawn",
    "Futuristic city skyline at night with neon reflections on wet streets",
    "A bowl of ramen, top-down view, steam rising",
    "An old oak tree in a foggy field, black and white photograph",
    "A red vintage car parked by a seaside cafe in the afternoon sun",
    "Macro shot of a dewdrop on a leaf with a rainbow refraction",
    "A cozy reading nook with a cat, a lamp and a stack of books",
]
NEGATIVE = " "  # Qwen-Image's recommended negative prompt: switches true CFG on
CFG = 4.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.results: dict[str, dict] = {}
        self.out = Path(args.out) if args.out else None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int = 1, warmup: int = 0) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def record(self, key: str, **values) -> None:
        self.results[key] = values
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {values}", flush=True)
        if self.out:
            self.out.write_text(json.dumps({"meta": self.meta, "results": self.results}, indent=1))

    def guarded(self, name: str, fn) -> None:
        if time.perf_counter() - self.t_start > self.args.budget_s:
            print(f"skip {name}: time budget spent", flush=True)
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 -- a failed variant is reported, the others still run
            traceback.print_exc()
            self.record(f"{name}:error", error=traceback.format_exc(limit=3))

    # ---- setup -------------------------------------------------------------------
    def build(self) -> None:
        self.t_start = time.perf_counter()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        pipe = build_in_memory("qwen-image", self.args.preset, seed=0, dtype=dtype, device=self.device)
        pipe.set_progress_bar_config(disable=True)
        self.sync()
        self.pipe = pipe
        self.ours = QwenImageStepwise(pipe, model_id=f"qwen-image-{self.args.preset}")
        n_dit = sum(p.numel() for p in pipe.transformer.parameters())
        self.meta = {
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "preset": self.args.preset,
            "dtype": str(dtype),
            "dit_params_b": round(n_dit / 1e9, 2),
            "build_s": round(time.perf_counter() - t0, 1),
        }
        print("meta", self.meta, flush=True)

    def params(self, size: int, steps: int, prompt: int = 0, seed: int = 0, n: int = 1) -> SamplingParams:
        return SamplingParams(
            prompt=PROMPTS[prompt % len(PROMPTS)],
            negative_prompt=NEGATIVE,
            true_cfg_scale=CFG,
            height=size,
            width=size,
            num_inference_steps=steps,
            seed=seed,
            num_outputs_per_prompt=n,
            output_type="pil",
        )

    def diffusers_list(self, size: int, steps: int, n: int, seed: int = 0):
        """diffusers' batched call with N distinct prompts (`prompt=[...]`), one output each."""
        return self.pipe(
            prompt=[PROMPTS[i % len(PROMPTS)] for i in range(n)],
            negative_prompt=[NEGATIVE] * n,
            true_cfg_scale=CFG,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        )

    def diffusers_call(self, size: int, steps: int, n: int = 1, prompt: int = 0, seed: int = 0):
        """The same request through diffusers' own __call__ (its `num_images_per_prompt` batching)."""
        p = self.params(size, steps, prompt, seed, n)
        return self.pipe(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            true_cfg_scale=p.true_cfg_scale,
            height=size,
            width=size,
            num_inference_steps=steps,
            num_images_per_prompt=n,
            generator=torch.Generator("cpu").manual_seed(seed),
        )

    # ---- parts -------------------------------------------------------------------
    def part_step(self, mode: str) -> None:
        reps = self.args.repeats
        for size in self.args.step_sizes:
            for label, batch_cfg in (("diffusers-way (2 forwards)", False), ("ours (CFG batched)", True)):
                self.ours.batch_cfg = batch_cfg
                state = self.ours.prepare(self.ours.resolve(self.params(size, 50)), "step")

                def one():
                    preds = self.ours.denoise_step([state])
                    self.ours.scheduler_step([state], preds)

                t = self.timed(one, repeats=reps, warmup=2)
                self.record(f"{mode}:step:{size}:{label}", ms=round(t * 1e3, 1), tokens=state.latents.shape[1])
            self.ours.batch_cfg = True

    def part_e2e(self, mode: str) -> None:
        steps = self.args.e2e_steps
        for size in self.args.e2e_sizes:
            if mode == "compiled":  # compile for these shapes first (not timed)
                self.diffusers_call(size, 2)
                self.ours.generate(self.params(size, 2))
            t = self.timed(lambda: self.diffusers_call(size, steps))
            self.record(f"{mode}:e2e:{size}:diffusers", s=round(t, 2), steps=steps)

            def ours():
                self.ours.clear_prompt_cache()  # encode inside the timing, as diffusers does
                self.ours.generate(self.params(size, steps))

            t = self.timed(ours)
            self.record(f"{mode}:e2e:{size}:ours", s=round(t, 2), steps=steps)

    def engine_run(self, n: int, steps: int, same_prompt: bool = False, size: int = 512) -> DiffusionEngine:
        self.ours.clear_prompt_cache()  # a timed run encodes its prompts, as diffusers does
        engine = DiffusionEngine(self.ours, EngineConfig(max_batch_tokens=1 << 20))
        for i in range(n):
            engine.add_request(f"r{i}", self.params(size, steps, prompt=0 if same_prompt else i, seed=i))
        final = engine.run()
        assert all(e.kind == "finished" for e in final.values()), final
        self.last_images = [np.asarray(final[f"r{i}"].output.images[0], dtype=np.int16) for i in range(n)]
        return engine

    def part_throughput(self, mode: str) -> None:
        steps = self.args.tp_steps
        if mode == "compiled":  # shapes of the batched calls, compiled before timing
            for n in self.args.concurrency:
                self.engine_run(n, 2)
                self.engine_run(n, 2, same_prompt=True)
                self.diffusers_call(512, 2, n=n)
                if n in self.args.list_concurrency:
                    self.diffusers_list(512, 2, n)
        else:  # library initialisation (cuBLAS, allocator) out of the timings
            self.diffusers_call(512, 2)
            self.engine_run(2, 2)
        single = self.timed(lambda: self.diffusers_call(512, steps))
        for n in self.args.concurrency:
            # One request at a time: N sequential calls take N x one call.
            self.record(f"{mode}:tp:{n}:diffusers one-by-one", img_s=round(1 / single, 3), s=round(single * n, 2))
            if n > 1:
                t = self.timed(lambda: self.diffusers_call(512, steps, n=n))
                self.record(f"{mode}:tp:{n}:same prompt: diffusers num_images_per_prompt", img_s=round(n / t, 3),
                            s=round(t, 2))
            t = self.timed(lambda: self.engine_run(n, steps, same_prompt=True))
            self.record(f"{mode}:tp:{n}:same prompt: ours step-batched", img_s=round(n / t, 3), s=round(t, 2))
            if n > 1 and n in self.args.list_concurrency:
                t = self.timed(lambda: self.diffusers_list(512, steps, n))
                self.record(f"{mode}:tp:{n}:distinct prompts: diffusers prompt list", img_s=round(n / t, 3),
                            s=round(t, 2))
            if n > 1:
                t = self.timed(lambda: self.engine_run(n, steps))
                self.record(f"{mode}:tp:{n}:distinct prompts: ours step-batched", img_s=round(n / t, 3),
                            s=round(t, 2))

    def part_prep(self, mode: str) -> None:
        n = max(self.args.concurrency)
        params = [self.ours.resolve(self.params(512, self.args.tp_steps, prompt=i, seed=i)) for i in range(n)]
        ids = [f"p{i}" for i in range(n)]

        def one_call():
            self.ours.clear_prompt_cache()
            self.ours.prepare_many(params, ids)

        def per_request():
            self.ours.clear_prompt_cache()
            for p, rid in zip(params, ids):
                self.ours.prepare(p, rid)

        for label, fn in (("one text-encoder call", one_call), ("one prepare per request", per_request)):
            t = self.timed(fn, repeats=self.args.repeats, warmup=1)
            self.record(f"{mode}:prep:{n} distinct:{label}", ms=round(t * 1e3, 1))

    def part_profile(self, mode: str) -> None:
        """ms per engine step (after admission) and the top CUDA kernels of one step."""
        from torch.profiler import ProfilerActivity, profile

        n, steps = max(self.args.concurrency), 8
        for label, same in (("same prompt", True), ("distinct prompts", False)):
            self.ours.clear_prompt_cache()
            engine = DiffusionEngine(self.ours, EngineConfig(max_batch_tokens=1 << 20))
            for i in range(n):
                engine.add_request(f"r{i}", self.params(512, steps, prompt=0 if same else i, seed=i))
            engine.step()  # admission + first step (compiles if a shape is new)
            t = self.timed(engine.step, repeats=3)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                engine.step()
                self.sync()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or self.device.type != "cuda"]
            attr = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            total = sum(getattr(e, attr) for e in events) or 1
            top = sorted(events, key=lambda e: -getattr(e, attr))[:6]
            kernels = {e.key[:70]: round(100 * getattr(e, attr) / total, 1) for e in top}
            self.record(f"{mode}:profile:{n} {label}:engine step", ms=round(t * 1e3, 1),
                        gpu_busy_ms=round(total / 1e3, 1), top_kernels_pct=kernels)
            engine.run()

    def part_graphs(self, mode: str) -> None:
        """N concurrent requests of --graph-size (512): our engine without / with CUDA graphs, diffusers one by one."""
        n, steps, size = self.args.graph_concurrency, self.args.tp_steps, self.args.graph_size
        self.diffusers_call(size, 2)  # compiles / initialises diffusers' shapes (not timed)
        single = self.timed(lambda: self.diffusers_call(size, steps))
        self.record(f"{mode}:graphs:{n}:diffusers one-by-one", img_s=round(1 / single, 3), s=round(single * n, 2))
        variants = [False]
        if self.device.type == "cuda":
            variants.append(True)
        else:
            print(f"{mode}:graphs: the CUDA-graph variant is skipped: CUDA graphs need a CUDA GPU "
                  f"(this run is on {self.device})", flush=True)
        transformer = self.pipe.transformer
        without: list = []
        for graphs in variants:
            if graphs:
                graph_dit(self.ours, self.args.cuda_graph_max)
            try:
                self.engine_run(n, 3, size=size)  # step 1: first use of the bucket (compiles); step 2 captures
                t = self.timed(lambda: self.engine_run(n, steps, size=size), repeats=min(3, self.args.repeats))
                extra = {}
                if graphs:  # same seeds and prompts: how far the graphed images are from the ungraphed ones
                    diff = max(int(np.abs(a - b).max()) for a, b in zip(self.last_images, without))
                    extra = {"graphs": cuda_graphs.stats([transformer]), "max_pixel_diff_vs_no_graphs": diff}
                else:
                    without = self.last_images
                self.record(f"{mode}:graphs:{n}:ours{' + CUDA graphs' if graphs else ''}", img_s=round(n / t, 3),
                            s=round(t, 2), **extra)
            finally:
                cuda_graphs.uninstall(transformer)

    def graphs_table(self) -> None:
        rows = {k: r for k, r in self.results.items() if ":graphs:" in k and not k.endswith("error")}
        if not rows:
            return
        size = self.args.graph_size
        print(f"\n| {self.args.graph_concurrency} x {size}x{size}, {self.args.tp_steps} steps | img/s | s | "
              "vs diffusers one-by-one (same mode) | graphs captured / replays / fallbacks |")
        print("|---|---|---|---|---|")
        for key, r in rows.items():
            mode, _, n, label = key.split(":", 3)
            base = self.results.get(f"{mode}:graphs:{n}:diffusers one-by-one", {}).get("img_s")
            g = r.get("graphs")
            graphs = (f"{g['captured']} / {g['replays']} / {sum(g['fallbacks'].values())}; max pixel diff vs no "
                      f"graphs {r['max_pixel_diff_vs_no_graphs']}" if g else "-")
            ratio = f"{r['img_s'] / base:.2f}x" if base else "-"
            print(f"| {mode}: {label} | {r['img_s']} | {r['s']} | {ratio} | {graphs} |")

    def wants(self, mode: str, part: str) -> bool:
        return part in self.args.parts or f"{mode}:{part}" in self.args.parts

    def run(self) -> None:
        self.build()
        for mode in self.args.modes:
            if mode == "compiled":
                t0 = time.perf_counter()
                # Batch sizes, text lengths and masks vary between variants: allow the recompiles.
                torch._dynamo.config.recompile_limit = 64
                torch._dynamo.config.accumulated_recompile_limit = 1024
                self.pipe.transformer.compile_repeated_blocks(fullgraph=True)
                self.record("compiled:setup", s=round(time.perf_counter() - t0, 1))
            for part, fn in (("throughput", self.part_throughput), ("prep", self.part_prep),
                             ("e2e", self.part_e2e), ("step", self.part_step), ("profile", self.part_profile),
                             ("graphs", self.part_graphs)):
                if self.wants(mode, part):
                    self.guarded(f"{mode}:{part}", lambda: fn(mode))
        if self.device.type == "cuda":
            self.meta["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        self.table()
        self.graphs_table()

    def table(self) -> None:
        print("\n| measurement | eager | compiled |")
        print("|---|---|---|")
        keys = dict.fromkeys(k.split(":", 1)[1] for k in self.results if ":" in k and not k.endswith("error"))
        for key in keys:
            cells = []
            for mode in ("eager", "compiled"):
                r = self.results.get(f"{mode}:{key}", {})
                cell = next((f"{r[u]} {u}" for u in ("ms", "s", "img_s") if u in r), "-")
                if "gpu_busy_ms" in r:
                    cell += f" (GPU busy {r['gpu_busy_ms']} ms)"
                if "img_s" in r:
                    cell = f"{r['img_s']} img/s ({r['s']} s)"
                cells.append(cell)
            print(f"| {key} | {cells[0]} | {cells[1]} |")
        print("meta", json.dumps(self.meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--parts", nargs="+", default=["throughput", "prep", "e2e", "step", "compiled:profile"],
                    help="PART or MODE:PART; parts: throughput prep e2e step profile graphs")
    ap.add_argument("--step-sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--e2e-sizes", nargs="+", type=int, default=[1024])
    ap.add_argument("--e2e-steps", type=int, default=50)
    ap.add_argument("--tp-steps", type=int, default=20)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--list-concurrency", nargs="*", type=int, default=[8],
                    help="concurrency levels at which diffusers' distinct-prompt list call is measured")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--graph-concurrency", type=int, default=8, help="the graphs part: concurrent requests")
    ap.add_argument("--graph-size", type=int, default=512, help="the graphs part: image size (CPU smoke: 64)")
    ap.add_argument("--cuda-graph-max", type=int, default=cuda_graphs.DEFAULT_MAX_GRAPHS,
                    help="the graphs part: dit_options cuda_graph_max")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip remaining parts after this many seconds")
    ap.add_argument("--out", default=None)
    Bench(ap.parse_args()).run()


if __name__ == "__main__":
    main()
