"""Server overhead on a GPU: the same Qwen-Image request offline (`Omni`) and through
`vllm serve --omni` + the openai client, in one run, on the same full-size weights.

    python benchmarks/bench_serving_overhead.py [--family qwen-image] [--size 1024] [--steps 50] [--repeat 2]

Offline first (load, one warm-up request, --repeat timed requests), then the offline engine is freed
and the server started on the same checkpoint and loaded by `vllm-omni bench` (`run_bench`: one
warm-up, the same prompts and seeds one at a time). Reports the mean e2e of each, the overhead in %,
and whether the decoded pixels are byte-identical (the bench's per-request md5s). Prints a table
last; JSON to $OUT/bench_serving_overhead.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def md5(image) -> str:
    """md5 of the decoded RGB pixels: what `vllm-omni bench --save-detailed` reports per image."""
    return hashlib.md5(image.convert("RGB").tobytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen-image")
    ap.add_argument("--ckpt-root", default=os.environ.get("OMNI_GPU_CKPT_DIR", "/dev/shm/omni-gpu-ckpt"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--log", default="/tmp/bench-serving-server.log")
    args = ap.parse_args()

    import torch

    from vllm_omni_plugin.bench import BenchConfig, run_bench
    from vllm_omni_plugin.bench.prompts import BUILTIN_PROMPTS
    from vllm_omni_plugin.checkpoints import cached_checkpoint
    from vllm_omni_plugin.diffusion.params import SamplingParams
    from vllm_omni_plugin.omni import Omni
    from vllm_omni_plugin.server.spawn import spawn_server

    ckpt = cached_checkpoint(args.family, "full", args.ckpt_root, device="cuda")
    req = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

    started = time.perf_counter()
    omni = Omni(str(ckpt), dtype=torch.bfloat16, device="cuda")
    load_offline = time.perf_counter() - started
    omni.generate([BUILTIN_PROMPTS[0]], SamplingParams(seed=0, **{**req, "num_inference_steps": 2}), use_tqdm=False)
    offline_times, offline_md5 = [], []
    for i in range(args.repeat):  # request i of the bench below: built-in prompt i, seed 100 + i
        torch.cuda.synchronize()
        started = time.perf_counter()
        (out,) = omni.generate([BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]], SamplingParams(seed=100 + i, **req),
                               use_tqdm=False)
        offline_times.append(time.perf_counter() - started)
        offline_md5.append(md5(out.images[0]))
    del omni, out
    gc.collect()
    torch.cuda.empty_cache()

    with spawn_server(ckpt, ["--dtype", "bfloat16"], log=Path(args.log)) as server:
        served = run_bench(BenchConfig(
            base_url=server.url, num_prompts=args.repeat, max_concurrency=1, seed=100, size=f"{args.size}x{args.size}",
            steps=args.steps, num_warmups=1, detailed=True, disable_tqdm=True))
        startup = server.startup_seconds
    if served["failed"]:
        raise RuntimeError(f"served requests failed: {served['errors']} {served['error_examples']}")
    online_times = [r["latency_s"] for r in served["requests"]]
    online_md5 = [r["output_md5"][0] for r in served["requests"]]

    off, on = sum(offline_times) / len(offline_times), sum(online_times) / len(online_times)
    results = {
        "family": args.family, "size": args.size, "steps": args.steps, "repeat": args.repeat,
        "offline_load_s": round(load_offline, 1), "server_startup_s": round(startup, 1),
        "offline_e2e_s": [round(t, 3) for t in offline_times], "online_e2e_s": [round(t, 3) for t in online_times],
        "overhead_pct": round(100 * (on - off) / off, 2), "byte_identical": offline_md5 == online_md5,
        "served_bench": {k: v for k, v in served.items() if k != "requests"},
    }
    text = json.dumps(results, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_serving_overhead.json").write_text(text)
    print(text)
    print(f"\n| {args.family} {args.size}x{args.size} {args.steps} steps, H200 bf16 | offline Omni | vllm serve --omni |")
    print("|---|---|---|")
    print(f"| mean e2e (s) | {off:.3f} | {on:.3f} |")
    print(f"| server overhead | | {results['overhead_pct']}% |")
    print(f"| decoded pixels byte-identical | | {results['byte_identical']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
