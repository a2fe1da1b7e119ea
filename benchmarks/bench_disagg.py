"""BAGEL end to end: AR and DiT stages on two hosts vs both in one server, side by side.

    sudo .venv/bin/python benchmarks/bench_disagg.py [--requests 10] [--steps 3] [--size 64]

Three servers of one tiny BAGEL checkpoint (vLLM's CPU build), the same flags: the colocated
`vllm serve MODEL --omni` here, and `--omni-stage ar` in a network namespace joined to this
machine by a veth pair (kv/netns.py; root) with `--omni-stage dit --omni-ar-url` here, UCX
pinned to TCP on the veth. After two warm-up requests on each, the same seeded text2img
request is sent --requests times, alternating between the two setups; reported: the median
client-side wall time of each, the medians of the servers' per-request timings (AR prefill, KV hand-over,
DiT, decode; the hand-over: the producer's gather + the store read colocated, the gather + the
NIXL READ disaggregated, whose AR prefill holds the HTTP round trip to the AR server), and the disaggregated overhead beyond the hand-over, as a
% of colocated (target <= 5%). Table last; JSON to $OUT/bench_disagg.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from vllm_omni_plugin.server.spawn import wait_healthy

VLLM = Path(sys.executable).with_name("vllm")
FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens", "1024", "--seed", "0",
         "--served-model-name", "tiny-bagel"]
TIMINGS = re.compile(r"omni request (\S+): ar_prefill ([\d.]+)s, kv hand-over ([\d.]+)s \(.*?\), dit ([\d.]+)s, "
                     r"decode ([\d.]+)s, total ([\d.]+)s")


def start(host, model: str, port: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    address = "127.0.0.1" if host.namespace is None else host.address
    cmd = [str(VLLM), "serve", model, "--omni", "--host", address, "--port", str(port), *FLAGS, *extra]
    env = {**host.env(), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "NIXL_LOG_LEVEL": "WARN"}
    proc = host.popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://{address}:{port}"


def wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        wait_healthy(url, proc, log, timeout)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.kv import netns
    from vllm_omni_plugin.server.spawn import free_port

    if netns.usable() is not None:
        raise SystemExit(netns.usable())
    work = Path(tempfile.mkdtemp(prefix="bench-disagg-"))
    model = str(make_checkpoint("bagel", "tiny", work / "ckpt"))
    body = {"model": "tiny-bagel", "prompt": "a red cube on a table", "size": f"{args.size}x{args.size}", "seed": 3,
            "num_inference_steps": args.steps, "response_format": "b64_json"}
    procs = []
    with netns.veth_host("omni-bench") as (there, here):
        try:
            logs = {k: work / f"{k}.log" for k in ("colocated", "ar", "dit")}
            colo, colo_url = start(here, model, free_port(), [], logs["colocated"])
            ar, ar_url = start(there, model, free_port(), ["--omni-stage", "ar"], logs["ar"])
            procs += [colo, ar]
            wait(ar_url, ar, logs["ar"])
            dit, dit_url = start(here, model, free_port(), ["--omni-stage", "dit", "--omni-ar-url", ar_url], logs["dit"])
            procs.append(dit)
            wait(colo_url, colo, logs["colocated"])
            wait(dit_url, dit, logs["dit"])
            urls = {"colocated": colo_url, "disaggregated": dit_url}
            wall: dict[str, list[float]] = {k: [] for k in urls}
            images: dict[str, set[str]] = {k: set() for k in urls}
            for i in range(args.requests + 2):
                for name, url in urls.items():
                    started = time.perf_counter()
                    r = requests.post(url + "/v1/images/generations", json=body, timeout=600)
                    r.raise_for_status()
                    if i >= 2:
                        wall[name].append(time.perf_counter() - started)
                    images[name].add(r.json()["data"][0]["b64_json"])
            time.sleep(1)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGINT)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    server_log = {"colocated": logs["colocated"], "disaggregated": logs["dit"]}
    result = {"requests": args.requests, "steps": args.steps, "size": args.size,
              "identical": images["colocated"] == images["disaggregated"] and len(images["colocated"]) == 1}
    for name in urls:
        rows = [m.groups()[1:] for m in TIMINGS.finditer(server_log[name].read_text())][2:]
        result[name] = {"wall_s": statistics.median(wall[name]),
                        **{f"{k}_s": statistics.median(float(r[i]) for r in rows)
                           for i, k in enumerate(("ar_prefill", "handover", "dit", "decode"))}}
    c, d = result["colocated"], result["disaggregated"]
    beyond = (d["wall_s"] - c["wall_s"]) - (d["handover_s"] - c["handover_s"])
    result["overhead_beyond_transfer_pct"] = 100 * beyond / c["wall_s"]
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_disagg.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("| setup | e2e s | AR prefill s | KV hand-over s | DiT s | decode s |\n|---|---|---|---|---|---|")
    for name in urls:
        r = result[name]
        print(f"| {name} | {r['wall_s']:.3f} | {r['ar_prefill_s']:.3f} | {r['handover_s']:.3f} | {r['dit_s']:.3f} "
              f"| {r['decode_s']:.3f} |")
    print(f"disaggregated beyond the hand-over: {beyond * 1000:+.1f} ms ({result['overhead_beyond_transfer_pct']:+.1f}% "
          f"of colocated); images identical: {result['identical']}")


if __name__ == "__main__":
    main()
