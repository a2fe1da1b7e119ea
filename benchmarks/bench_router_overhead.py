"""Router overhead per request: N `vllm serve --omni` replicas of one diffusion model behind
vLLM's router (`vllm-router --policy power_of_two`), the same requests sent directly to a
replica and through the router, interleaved in one run.

    python benchmarks/bench_router_overhead.py [--family qwen-image] [--preset tiny] [--replicas 2]
        [--requests 200] [--size 64] [--steps 1] [--device cpu]

Two kinds of request, each timed `--requests` times per path on one keep-alive session:
`GET /v1/models` (pure forwarding: what the router adds to any request) and a small
`POST /v1/images/generations` (a real generation; its own time is the same on both paths).
Direct requests go to the replicas in turn; each iteration alternates which path goes first,
so drift in the machine's load falls on both. Reports p50 / p90 / mean per path and the
router's p50 overhead in ms (target <= 2 ms). Table last; JSON to $OUT/bench_router_overhead.json
when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def router(workers: list[str], log: Path):
    """`vllm-router` over `workers` on a free port; yields its URL once /health answers."""
    import requests

    from vllm_omni_plugin.server.spawn import free_port

    exe = Path(sys.executable).with_name("vllm-router")
    exe = str(exe) if exe.exists() else shutil.which("vllm-router")
    if exe is None:
        raise SystemExit("vllm-router is not installed: pip install vllm-router")
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
                                 "--policy", "power_of_two", "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen-image")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--ckpt-root", default=os.environ.get("OMNI_CKPT_DIR", str(Path(tempfile.gettempdir()) / "omni-ckpt")))
    ap.add_argument("--device", default="cpu", help="where the checkpoint factory makes the weights")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--server-arg", action="append", default=[], help="one more `vllm serve` flag (repeatable)")
    args = ap.parse_args()

    import requests

    from vllm_omni_plugin.checkpoints import cached_checkpoint
    from vllm_omni_plugin.server.spawn import spawn_server

    ckpt = cached_checkpoint(args.family, args.preset, args.ckpt_root, device=args.device)
    logs = Path(tempfile.mkdtemp(prefix="bench-router-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    body = {"prompt": "a red cat", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps, "seed": 0}
    kinds = {
        "GET /v1/models": lambda s, url: s.get(url + "/v1/models", timeout=60),
        "POST /v1/images/generations": lambda s, url: s.post(url + "/v1/images/generations", json=body, timeout=600),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"direct": [], "router": []} for k in kinds}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(spawn_server(ckpt, args.server_arg, log=logs / f"replica-{i}.log", env=env))
                   for i in range(args.replicas)]
        url = stack.enter_context(router([s.url for s in servers], logs / "router.log"))
        session = requests.Session()
        for kind, send in kinds.items():
            for server in servers:  # warm-up: connections, the engine's first request
                assert send(session, server.url).status_code == 200
            for _ in range(4):
                assert send(session, url).status_code == 200
            for i in range(args.requests):
                order = [("direct", servers[i % len(servers)].url), ("router", url)]
                for path, target in order if i % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    r = send(session, target)
                    times[kind][path].append(time.perf_counter() - started)
                    assert r.status_code == 200, (path, r.status_code, r.text[:300])

    rows = []
    for kind, paths in times.items():
        stats = {p: {"p50_ms": 1e3 * percentile(v, 0.5), "p90_ms": 1e3 * percentile(v, 0.9),
                     "mean_ms": 1e3 * statistics.fmean(v)} for p, v in paths.items()}
        rows.append({"request": kind, **{f"{p}_{k}": round(x, 3) for p, s in stats.items() for k, x in s.items()},
                     "overhead_p50_ms": round(stats["router"]["p50_ms"] - stats["direct"]["p50_ms"], 3)})
    result = {"family": args.family, "preset": args.preset, "replicas": args.replicas, "requests": args.requests,
              "size": args.size, "steps": args.steps, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_router_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| request | direct p50 ms | router p50 ms | direct p90 | router p90 | router overhead p50 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['request']} | {r['direct_p50_ms']:.2f} | {r['router_p50_ms']:.2f} | {r['direct_p90_ms']:.2f} "
              f"| {r['router_p90_ms']:.2f} | {r['overhead_p50_ms']:.2f} |")
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
