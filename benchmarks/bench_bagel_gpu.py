"""BAGEL-7B-MoT (full dimensions, random weights, bf16) end to end through `vllm serve --omni` on a GPU.

    python benchmarks/bench_bagel_gpu.py [--ckpt-root /dev/shm/omni-gpu-ckpt] [--size 1024] [--steps 50]
                                         [--concurrent 8] [--concurrent-steps 10] [--concurrent-size 512]
                                         [--extra 512:20 ...] [--reference-steps 3]

What it measures, in one run, on the shipped stage config (vllm_omni_plugin/families/bagel/stage_config.yaml):
  * server start-up (AR engine: load, torch.compile, CUDA graphs; DiT stage load)
  * one text2img request (size x size, --steps): client e2e, and the server's own per-request
    breakdown (its log line "omni request ...": AR prefill, KV hand-over bytes and GB/s, DiT
    steps, decode); orchestration = e2e - (prefill + hand-over + DiT + decode)
  * each --extra SIZE:STEPS text2img request alone, with the same breakdown
  * one img2img request through /v1/images/edits (a size x size edit image: a ~9k-token context
    with its VAE and ViT blocks), a few steps: hand-over of a large context (bytes, GB/s)
  * --concurrent text2img requests (--concurrent-size, default --size) one at a time, then all at
    once (--concurrent-steps each):
    images/s of both
  * GPU memory in use while serving (nvidia-smi) with the AR engine's --gpu-memory-utilization
  * the plain-PyTorch reference (tests/reference/bagel_generation.py: full sequence, no KV cache)
    on the same weights: seconds per denoising step at the same size, for scale
Prints a table last and writes JSON to $OUT/bench_bagel_gpu.json when OUT is set.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"omni request (\S+): ar_prefill ([\d.]+)s, kv hand-over ([\d.]+)s \(([\d.]+) MB, ([\d.]+) GB/s\), "
                  r"dit ([\d.]+)s, decode ([\d.]+)s, total ([\d.]+)s")


def gpu_memory_used_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return round(float(out.split()[0]) / 1024, 1)


def breakdowns(log: Path) -> list[dict]:
    rows = []
    for m in LINE.finditer(log.read_text()):
        rid, *vals = m.groups()
        keys = ("ar_prefill", "transfer", "transfer_mb", "transfer_gbps", "dit", "decode", "total")
        rows.append({"request": rid, **dict(zip(keys, map(float, vals)))})
    return rows


def edit_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-root", default=os.environ.get("OMNI_GPU_CKPT_DIR", "/dev/shm/omni-gpu-ckpt"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--concurrent-steps", type=int, default=10)
    ap.add_argument("--concurrent-size", type=int, default=None, help="side of the concurrent requests (default --size)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="SIZE:STEPS",
                    help="further single text2img requests measured like the main one, e.g. 512:20")
    ap.add_argument("--edit-steps", type=int, default=4)
    ap.add_argument("--reference-steps", type=int, default=3, help="0 skips the reference")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="the AR engine's share of the GPU")
    ap.add_argument("--log", default="/tmp/bench-bagel-server.log")
    args = ap.parse_args()

    from vllm_omni_plugin.checkpoints import cached_checkpoint
    from vllm_omni_plugin.server.spawn import spawn_server

    t0 = time.perf_counter()
    ckpt = cached_checkpoint("bagel", "full", args.ckpt_root, device="cuda")
    results: dict = {"checkpoint_s": round(time.perf_counter() - t0, 1), "size": args.size, "steps": args.steps}
    log = Path(args.log)
    size = f"{args.size}x{args.size}"
    serve_args = ["--dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    results["gpu_memory_utilization"] = args.gpu_memory_utilization
    with spawn_server(ckpt, serve_args, log=log) as server:
        results["startup_s"] = round(server.startup_seconds, 1)
        client = server.client()
        model = str(ckpt)

        def t2i(steps: int, seed: int, sz: str = size) -> float:
            started = time.perf_counter()
            r = client.images.generate(model=model, prompt="a red cat on a blue chair", size=sz,
                                       extra_body={"seed": seed, "num_inference_steps": steps})
            assert r.data[0].b64_json
            return time.perf_counter() - started

        t2i(2, 0, "256x256")  # warm-up: first requests pay lazy initialisation
        t2i(2, 0)
        n_before = len(breakdowns(log))
        e2e = t2i(args.steps, 1)
        (one,) = breakdowns(log)[n_before:]
        parts = one["ar_prefill"] + one["transfer"] + one["dit"] + one["decode"]
        results["text2img"] = {**one, "e2e_client": round(e2e, 3),
                               "orchestration_and_http": round(e2e - parts, 3),
                               "orchestration_and_handover_pct": round(100 * (e2e - parts + one["transfer"]) / e2e, 2)}
        results["gpu_memory_used_gib_serving"] = gpu_memory_used_gib()

        results["extra"] = []
        for spec in args.extra:
            side, steps = (int(x) for x in spec.split(":"))
            sz = f"{side}x{side}"
            t2i(2, 0, sz)  # first request at this size: lazy shape-dependent setup out of the timing
            n_before = len(breakdowns(log))
            e2e = t2i(steps, 3, sz)
            (row,) = breakdowns(log)[n_before:]
            results["extra"].append({**row, "size": sz, "steps": steps, "e2e_client": round(e2e, 3),
                                     "dit_s_per_step": round(row["dit"] / steps, 4)})

        n_before = len(breakdowns(log))
        started = time.perf_counter()
        client.images.edit(model=model, image=("edit.png", edit_png(args.size), "image/png"), prompt="make it blue",
                           extra_body={"seed": 2, "num_inference_steps": args.edit_steps, "size": size})
        (edit,) = breakdowns(log)[n_before:]
        results["img2img"] = {**edit, "e2e_client": round(time.perf_counter() - started, 3)}

        csize = f"{args.concurrent_size or args.size}x{args.concurrent_size or args.size}"
        t2i(2, 0, csize)
        started = time.perf_counter()
        for i in range(args.concurrent):
            t2i(args.concurrent_steps, 10 + i, csize)
        sequential = time.perf_counter() - started
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                t2i(args.concurrent_steps, 10 + i, csize)
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrent)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = time.perf_counter() - started
        if errors:
            raise errors[0]
        results["concurrency"] = {
            "requests": args.concurrent, "steps": args.concurrent_steps, "size": csize,
            "one_at_a_time_img_s": round(args.concurrent / sequential, 3),
            "concurrent_img_s": round(args.concurrent / together, 3),
            "speedup": round(sequential / together, 2),
        }
        results["gpu_memory_used_gib_after_load"] = gpu_memory_used_gib()

    if args.reference_steps:
        sys.path.insert(0, str(ROOT / "tests"))
        import torch

        from reference.bagel_generation import BagelReference

        torch.backends.cuda.matmul.allow_tf32 = True
        ref = BagelReference(ckpt, device="cuda")
        ref.generate("a red cat", height=256, width=256, seed=0, steps=2)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        ref.generate("a red cat on a blue chair", height=args.size, width=args.size, seed=1, steps=args.reference_steps + 1)
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - started) / args.reference_steps
        ours_per_step = results["text2img"]["dit"] / max(args.steps - 1, 1)
        results["reference"] = {"seconds_per_step": round(per_step, 3), "ours_seconds_per_step": round(ours_per_step, 3)}

    text = json.dumps(results, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_bagel_gpu.json").write_text(text)
    print(text)
    t = results["text2img"]
    c = results["concurrency"]
    print("\n| BAGEL full dims, bf16, H200 | value |\n|---|---|")
    for k, v in [
        ("server start-up (s)", results["startup_s"]),
        (f"text2img {size} {args.steps} steps e2e (s)", t["e2e_client"]),
        ("  AR prefill (s)", t["ar_prefill"]),
        ("  KV hand-over (s / MB / GB/s)", f'{t["transfer"]} / {t["transfer_mb"]} / {t["transfer_gbps"]}'),
        ("  DiT steps (s, s/step)", f'{t["dit"]} ({t["dit"] / args.steps:.4f})'),
        ("  decode (s)", t["decode"]),
        ("  orchestration + HTTP (s)", t["orchestration_and_http"]),
        ("  orchestration + hand-over (% of e2e)", t["orchestration_and_handover_pct"]),
        *[(f"text2img {x['size']} {x['steps']} steps e2e (s): prefill / hand-over / DiT (s/step) / decode",
           f"{x['e2e_client']}: {x['ar_prefill']} / {x['transfer']} / {x['dit']} ({x['dit_s_per_step']}) / {x['decode']}")
          for x in results["extra"]],
        (f"img2img hand-over (MB / GB/s)", f'{results["img2img"]["transfer_mb"]} / {results["img2img"]["transfer_gbps"]}'),
        (f"{c['requests']} x text2img {c['size']} {c['steps']} steps: one at a time (img/s)", c["one_at_a_time_img_s"]),
        (f"  concurrent (img/s, speed-up)", f'{c["concurrent_img_s"]} ({c["speedup"]}x)'),
        ("GPU memory used while serving (GiB)", results["gpu_memory_used_gib_serving"]),
        *([("reference s/step vs ours", f'{results["reference"]["seconds_per_step"]} vs '
                                        f'{results["reference"]["ours_seconds_per_step"]}')] if "reference" in results else []),
    ]:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
