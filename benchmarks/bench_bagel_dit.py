"""BAGEL's DiT stage, step by step: CFG branches per forward vs batched vs regionally compiled.

    python benchmarks/bench_bagel_dit.py                     # CPU smoke: tiny checkpoint, < 1 min
    python benchmarks/bench_bagel_dit.py --preset full --device cuda --ckpt /dev/shm/omni-gpu-ckpt/bagel \\
        --runs 512:20 1024:50 512:20x8                       # the GPU set (SIZE:STEPS[xCONCURRENT])
    ... --variants batched cfg-parallel-2 [--img2img --variants batched cfg-parallel-2 cfg-parallel-3]
                                                             # CFG-parallel: 2 (3) GPUs

What one run measures, on one checkpoint (written by the tests' factory when --ckpt is absent,
or when it lacks config.json):
  * for each run SIZE:STEPS[xN] (N concurrent text2img requests, default 1) and each variant
        per-branch   dit_options cfg_batch: false (one MoT forward per CFG branch)
        batched      the default (every branch of every request in one forward; attention_mode auto)
        batched-padded / batched-per-row / batched-varlen
                     batched with dit_options attention_mode padded / per_row / varlen (the rows'
                     contexts right-padded + masked, one SDPA per row, packed for a varlen kernel)
        compiled     batched + compile: regional (one warm-up request compiles first)
        cfg-parallel-2 / cfg-parallel-3
                     dit_options cfg_degree 2 / 3: the CFG branches on 2 / 3 ranks (spawned
                     processes under the engine, diffusion/workers.py; gloo on CPU, NCCL on CUDA,
                     one GPU per rank); the requests go through the engine with their contexts
                     handed over as the AR stage hands them (each worker rank is sent its own
                     branches' KV: the bytes are reported), the per-step time is taken between the
                     engine's step events (CUDA synchronised at each); cfg-parallel-3 needs --img2img
                     (text2img has two branches)
    seconds per denoising step (prepare, i.e. the context prefill, and the VAE decode are
    outside the timed loop; CUDA is synchronised around it) and the largest difference of
    the final latents from the per-branch ones (same seeds);
  * the plain-PyTorch reference (tests/reference/bagel_generation.py: full sequence per branch,
    no KV cache) at the first run's size: seconds per text2img CFG step (its two forwards, median
    of --reference-steps), for scale (0 skips);
  * --attention: the median time of --repeat calls of one batched step's attention, four ways (SDPA with a boolean mask
    over right-padded contexts, FlexAttention with a block mask, one SDPA per row, the rows packed
    back to back through the DiT's varlen path: dit/attention.py, torch's varlen_attn on CUDA) at BAGEL's
    head layout (28 query heads, 4 KV heads, d 128) and --attention-shape.
Prints JSON, then a short table last; writes $OUT/bench_bagel_dit.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("per-branch", "batched", "compiled", "batched-padded", "batched-per-row", "batched-varlen",
            "cfg-parallel-2", "cfg-parallel-3")
#: batched variants with a fixed attention_mode ("batched" and the others: "auto")
ATTENTION = {"batched-padded": "padded", "batched-per-row": "per_row", "batched-varlen": "varlen"}
PARALLEL = {"cfg-parallel-2": 2, "cfg-parallel-3": 3}
PROMPTS = ["a red cat on a blue chair", "a lighthouse at dusk, oil painting", "two dogs playing in the snow",
           "a bowl of ramen, top view", "a city street in the rain at night", "an astronaut riding a horse",
           "a watercolor map of an island", "a robot reading a book in a library"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_run(text: str) -> tuple[int, int, int]:
    size, _, rest = text.partition(":")
    steps, _, n = rest.partition("x")
    return int(size), int(steps), int(n or 1)


def checkpoint(args: argparse.Namespace) -> Path:
    from vllm_omni_plugin.checkpoints import make_checkpoint

    path = Path(args.ckpt) if args.ckpt else Path(tempfile.mkdtemp(prefix="bench-bagel-dit-"))
    if not (path / "config.json").exists():
        make_checkpoint("bagel", args.preset, path, device="cuda" if args.device.startswith("cuda") else "cpu")
    return path


def request(i: int, size: int, steps: int, img2img: bool):
    from vllm_omni_plugin.diffusion import SamplingParams

    images = None
    if img2img:
        from PIL import Image

        pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(100 + i))
        images = [Image.fromarray(pixels.to(torch.uint8).numpy())]
    return SamplingParams(prompt=PROMPTS[i % len(PROMPTS)], height=size, width=size, seed=i, images=images,
                          num_inference_steps=steps, output_type="latent")


def run_variant(pipe, variant: str, size: int, steps: int, n: int, device: str,
                img2img: bool = False) -> tuple[float, list[torch.Tensor]]:
    """Seconds per step of n concurrent requests' denoising loop, and their final latents."""
    pipe.batch_cfg = variant != "per-branch"
    pipe.attention_mode = ATTENTION.get(variant, "auto")
    states = [pipe.prepare(pipe.resolve(request(i, size, steps, img2img)), f"{variant}-{size}-{i}") for i in range(n)]
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        while not states[0].done:
            preds = pipe.denoise_step(states)
            pipe.scheduler_step(states, preds)
    sync(device)
    return (time.perf_counter() - started) / (steps - 1), [s.latents.float().cpu() for s in states]


def run_parallel(engine, pipe, variant: str, size: int, steps: int, n: int, device: str,
                 img2img: bool) -> tuple[float, list[torch.Tensor]]:
    """A CFG-parallel engine's seconds per step (between the first and the last step event of the
    first request; CUDA synchronised at each) for n concurrent requests, and their final latents.
    Their contexts are prefilled here and handed over, as the AR stage hands them."""
    from vllm_omni_plugin.families.bagel.dit.encode import encode_context

    ids = [f"{variant}-{size}-{i}-{time.monotonic_ns()}" for i in range(n)]
    for i, rid in enumerate(ids):
        p = pipe.resolve(request(i, size, steps, img2img))
        engine.add_request(rid, p, encode_context(pipe.model, rid, p.prompt, p.images[0] if p.images else None,
                                                  p.negative_prompt, p.height, p.width))
    stamps: list[float] = []

    def on_event(event) -> None:
        if event.kind == "step" and event.request_id == ids[0]:
            sync(device)
            stamps.append(time.perf_counter())

    final = engine.run(on_event)
    failed = {rid: repr(e.error) for rid, e in final.items() if e.kind != "finished"}
    if failed:
        raise RuntimeError(f"{variant}: {failed}")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), [final[rid].output.latents.float().cpu() for rid in ids]


def reference_per_step(ckpt: Path, size: int, device: str, steps: int) -> float:
    """The reference's seconds per text2img CFG step: its full-sequence forward of the cond branch
    (prompt + image block) and of the empty text-CFG branch (image block alone), median of `steps`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference.bagel_generation import BagelReference

    ref = BagelReference(ckpt, device=device)
    h = w = size // ref.down
    x = torch.randn(h * w, ref.p * ref.p * ref.z, generator=torch.Generator("cpu").manual_seed(0)).to(device)
    contexts = ([ref.text_block(PROMPTS[0])], [])

    def step() -> float:
        sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            for context in contexts:
                ref.lin("llm2vae", ref.forward(context + [ref.image_block(x, 1.0, h, w)])[-(h * w) - 1:-1])
        sync(device)
        return time.perf_counter() - started

    step()  # warm-up
    return sorted(step() for _ in range(steps))[steps // 2]


def attention_bench(shape: str, device: str, dtype: torch.dtype, repeat: int) -> dict:
    """One batched step's attention: rows of right-padded contexts + the image tokens, three ways."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_query, *lengths = (int(x) for x in shape.split(","))
    heads, kv_heads, d, longest = 28, 4, 128, max(lengths)
    rows = len(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(rows, heads, n_query, d, generator=g).to(device, dtype)
    k = torch.randn(rows, kv_heads, longest + n_query, d, generator=g).to(device, dtype)
    v = torch.randn(rows, kv_heads, longest + n_query, d, generator=g).to(device, dtype)
    lens = torch.tensor(lengths, device=device)
    keep = torch.ones(rows, 1, n_query, longest + n_query, dtype=torch.bool, device=device)
    for r, n in enumerate(lengths):
        keep[r, :, :, n:longest] = False

    def masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    def per_row():
        out = []
        for r, n in enumerate(lengths):
            idx = torch.cat([torch.arange(n, device=device), torch.arange(longest, longest + n_query, device=device)])
            out.append(F.scaled_dot_product_attention(q[r:r + 1], k[r:r + 1, :, idx], v[r:r + 1, :, idx], enable_gqa=True))
        return torch.cat(out)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < lens[b]) | (kv_idx >= longest)

    block_mask = create_block_mask(mask_mod, rows, None, n_query, longest + n_query, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def flexed():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    # attention_mode "varlen" as the DiT runs it: the contexts packed once, the image tokens' own K/V
    # written into their slots, then the kernel of this device / dtype (torch's varlen_attn on CUDA)
    from vllm_omni_plugin.families.bagel.dit.attention import pack_context, varlen_kernel
    from vllm_omni_plugin.families.bagel.dit.context import BranchKV

    to_rows = lambda t: t.transpose(1, 2)  # noqa: E731  (rows, heads, tokens, d) -> (rows, tokens, heads, d)
    contexts = [BranchKV((to_rows(k)[r, :n],), (to_rows(v)[r, :n],), n) for r, n in enumerate(lengths)]
    packed = pack_context(contexts, n_query, 1, varlen_kernel(torch.device(device), dtype))
    q_rows, k_own, v_own = to_rows(q), to_rows(k)[:, longest:], to_rows(v)[:, longest:]

    def varlen():
        return packed.attend(0, q_rows, k_own, v_own).unflatten(-1, (heads, d)).transpose(1, 2)

    out = {"varlen_kernel": packed.kernel.__name__}
    oracle = per_row()
    for name, fn in (("sdpa_bool_mask", masked), ("flex_block_mask", flexed), ("per_row_loop", per_row),
                     ("varlen_packed", varlen)):
        started = time.perf_counter()
        result = fn()  # warm-up (flex: compiles)
        sync(device)
        first = time.perf_counter() - started
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - started)
        out[name] = {"ms": round(sorted(times)[len(times) // 2] * 1e3, 3), "first_call_s": round(first, 2),
                     "max_abs_vs_per_row": float((result.float() - oracle.float()).abs().max())}
    out["shape"] = {"query_tokens": n_query, "context_lengths": lengths, "heads": heads, "kv_heads": kv_heads, "head_dim": d}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="checkpoint preset of the tests' factory (tiny, full)")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (written there when it lacks config.json)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--runs", nargs="+", default=["64:6", "64:6x4"], metavar="SIZE:STEPS[xN]")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS,
                    help="default: the one-device ones; cfg-parallel-N spawns N ranks (N GPUs on CUDA)")
    ap.add_argument("--img2img", action="store_true",
                    help="img2img requests (three CFG branches; a random input image of the output size)")
    ap.add_argument("--reference-steps", type=int, default=2)
    ap.add_argument("--attention", action="store_true", help="also the masked-attention comparison")
    ap.add_argument("--attention-shape", default="258,40,0", metavar="QUERY,LEN1,LEN2,...",
                    help="image-block query tokens, then each row's context length (default: 256^2 text2img)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on CPU, where a shared machine makes more threads noisy)")
    args = ap.parse_args(argv)
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)

    from vllm_omni_plugin.diffusion.acceleration import DitOptions
    from vllm_omni_plugin.families.bagel.pipeline import load_bagel_pipeline

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    ckpt = checkpoint(args)
    runs = [parse_run(r) for r in args.runs]
    load = {"cpu": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    eager = load_bagel_pipeline(ckpt, dtype=dtype, device=args.device)
    compiled = None
    if "compiled" in args.variants:
        compiled = load_bagel_pipeline(ckpt, dtype=dtype, device=args.device)
        compiled.apply_dit_options(DitOptions(compile="regional"))
        started = time.perf_counter()
        run_variant(compiled, "compiled", runs[0][0], 3, runs[0][2], args.device)  # compiles (dynamic sizes)
        load["compile_warmup_s"] = round(time.perf_counter() - started, 2)
    if "cfg-parallel-3" in args.variants and not args.img2img:
        ap.error("cfg-parallel-3 needs --img2img (text2img has two CFG branches: cond, cfg_text)")
    if any(steps < 3 for _, steps, _ in runs) and set(PARALLEL) & set(args.variants):
        ap.error("cfg-parallel variants need STEPS >= 3 (two step events to time between)")
    results: dict = {"device": args.device, "dtype": dtype, "preset": args.preset, "img2img": args.img2img,
                     "machine": load, "runs": []}
    rows = [{"size": size, "steps": steps, "concurrent": n} for size, steps, n in runs]
    for variant in args.variants:
        engine = None
        if variant in PARALLEL:  # rank 0 is the eager pipeline (now one rank of the engine), the others spawned
            from vllm_omni_plugin.diffusion.parallel import ParallelConfig
            from vllm_omni_plugin.diffusion.workers import launch_engine

            engine = launch_engine(functools.partial(load_bagel_pipeline, str(ckpt), dtype), device=args.device,
                                   options=DitOptions(parallel=ParallelConfig(cfg_degree=PARALLEL[variant])),
                                   main_pipeline=eager)
        try:
            for row, (size, steps, n) in zip(rows, runs):
                if engine is not None:
                    run_parallel(engine, eager, variant, size, 3, n, args.device, args.img2img)  # warm-up
                    per_step, latents = run_parallel(engine, eager, variant, size, steps, n, args.device,
                                                     args.img2img)
                else:
                    pipe = compiled if variant == "compiled" else eager
                    run_variant(pipe, variant, size, 3, n, args.device, args.img2img)  # warm-up at this shape
                    per_step, latents = run_variant(pipe, variant, size, steps, n, args.device, args.img2img)
                row.setdefault("_latents", latents)
                row[variant] = {"s_per_step": round(per_step, 5),
                                "images_per_s": round(n / (per_step * (steps - 1)), 3),
                                "max_abs_latents_vs_first": max(float((a - b).abs().max())
                                                                for a, b in zip(latents, row["_latents"]))}
            if engine is not None:  # the context KV each worker rank was sent (all runs, warm-ups included)
                results.setdefault("kv_bytes_sent_per_rank", {})[variant] = dict(engine.pipeline.parallel.sent_bytes)
        finally:
            if engine is not None:
                engine.close()
    for row in rows:
        row.pop("_latents")
    results["runs"] = rows
    if args.reference_steps:
        results["reference"] = {"size": runs[0][0],
                                "s_per_step": round(reference_per_step(ckpt, runs[0][0], args.device, args.reference_steps), 5)}
    if args.attention:
        results["attention"] = attention_bench(args.attention_shape, args.device, getattr(torch, dtype), args.repeat)
    load["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    text = json.dumps(results, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_bagel_dit.json").write_text(text)
    print(text)
    task = "img2img" if args.img2img else "text2img"
    print(f"\n| BAGEL DiT {task}, {args.preset}, {dtype}, {args.device} (load {load['loadavg_start'][0]} -> "
          f"{load['loadavg_end'][0]}) | " + " | ".join(f"{v} s/step" for v in args.variants) + f" | vs {args.variants[0]} |")
    print("|---|" + "---|" * (len(args.variants) + 1))
    for row in results["runs"]:
        first = row[args.variants[0]]["s_per_step"]
        ratios = " / ".join(f"{first / row[v]['s_per_step']:.2f}x" for v in args.variants)
        print(f"| {row['size']}^2, {row['steps']} steps, {row['concurrent']} concurrent | "
              + " | ".join(str(row[v]["s_per_step"]) for v in args.variants) + f" | {ratios} |")
    if "reference" in results:
        print(f"| reference (full sequence, no KV cache) {results['reference']['size']}^2 | "
              f"{results['reference']['s_per_step']} s/step |")
    if "attention" in results:
        a = results["attention"]
        print(f"| attention {a['shape']['query_tokens']} query x contexts {a['shape']['context_lengths']} (ms) | "
              + ", ".join(f"{k} {a[k]['ms']}" for k in ("sdpa_bool_mask", "flex_block_mask", "per_row_loop", "varlen_packed"))
              + f" ({a['varlen_kernel']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
