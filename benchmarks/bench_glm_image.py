"""GLM-Image end to end: `vllm serve --omni` (AR in vLLM -> DiT) vs diffusers' GlmImagePipeline (AR in transformers).

Real dimensions with random weights (`vllm-omni make-checkpoint glm-image --preset full`:
9B AR prior, 7B DiT, ByT5 glyph encoder, VAE), bf16 on one GPU, in one run:

  ours       a real `vllm serve CKPT --omni` (the shipped stage config; the AR engine's
             GPU memory share capped by --gpu-memory-utilization so the DiT fits beside it), the real
             `openai` client: one request at a time (latency), then CONCURRENCY
             requests at once (images/s)
  diffusers  `GlmImagePipeline.from_pretrained(CKPT)` on the same GPU after the server
             stopped: one `pipe(...)` call per image (its AR stage: transformers'
             `generate`, sampling with the checkpoint's generation_config.json), the
             same requests one at a time; images/s = 1 / latency (diffusers serves one
             request at a time)

Both sides: --size (default 1024x1024), --steps (default 50), the same prompts, guidance
1.5 (GLM-Image's default). Targets (issue 13): ours >= 2x faster per image; 4 concurrent
>= 3x the images/s of one at a time.

    python benchmarks/bench_glm_image.py --out glm_image.json                 # H200
    python benchmarks/bench_glm_image.py --ckpt /data/glm-full --out r.json   # reuse a checkpoint
    python benchmarks/bench_glm_image.py --preset tiny --size 256x256 --steps 2 --cpu   # smoke test

The full checkpoint is ~32 GB on disk (bf16), written once to --ckpt (default
/tmp/glm-image-full). Results go to --out as JSON after every measurement.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    'A neon sign that says "OPEN LATE" above a rainy street, night photo',
    "A watercolor painting of a lighthouse on a cliff at dawn",
    "A bowl of ramen, top-down view, steam rising",
    "An old oak tree in a foggy field, black and white photograph",
    "A red vintage car parked by a seaside cafe in the afternoon sun",
    "Macro shot of a dewdrop on a leaf with a rainbow refraction",
    "A cozy reading nook with a cat, a lamp and a stack of books",
    'A chalkboard menu reading "SOUP 5" in a small bistro',
]

class Results:
    def __init__(self, out: str | None, meta: dict) -> None:
        self.out = Path(out) if out else None
        self.meta = meta
        self.results: dict[str, dict] = {}

    def record(self, key: str, **values) -> None:
        self.results[key] = values
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {values}", flush=True)
        if self.out:
            self.out.write_text(json.dumps({"meta": self.meta, "results": self.results}, indent=1))


def ensure_checkpoint(path: Path, preset: str, device: str) -> Path:
    if (path / "model_index.json").is_file():
        return path
    started = time.perf_counter()
    cli = Path(sys.executable).with_name("vllm-omni")
    # A child process: the weights it draws on the GPU are gone before the server starts.
    subprocess.run([str(cli), "make-checkpoint", "glm-image", "--preset", preset, "--out", str(path),
                    "--device", device], check=True)
    print(f"checkpoint written to {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    import requests

    port = free_port()
    log = workdir / "server.log"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(ckpt), "--omni", "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "glm-image", "--omni-max-queue", "64", "--seed", "0"]
    # vLLM serve flags given here are the AR engine's (over the stage config's engine_args).
    if args.cpu:
        cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
    else:
        cmd += ["--dtype", "bfloat16", "--gpu-memory-utilization", str(args.ar_gpu_util)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except requests.ConnectionError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"server not healthy after {args.startup_timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def bench_ours(ckpt: Path, args: argparse.Namespace, res: Results) -> None:
    from openai import OpenAI

    workdir = Path(tempfile.mkdtemp(prefix="bench-glm-"))
    started = time.perf_counter()
    proc, url, log = start_server(ckpt, args, workdir)
    res.record("ours:startup", seconds=round(time.perf_counter() - started, 1), log=str(log))
    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=3600)

    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = client.images.generate(model="glm-image", prompt=PROMPTS[i % len(PROMPTS)], size=args.size,
                                   extra_body={"num_inference_steps": args.steps, "seed": i})
        assert base64.b64decode(r.data[0].b64_json)  # a real PNG came back
        return time.perf_counter() - t0

    try:
        one(0)  # warm-up (first-request compilation, allocator)
        latencies = [one(i) for i in range(1, 1 + args.repeats)]
        lat = statistics.median(latencies)
        res.record("ours:1", latency_s=round(lat, 3), images_per_s=round(1 / lat, 4), runs=[round(x, 3) for x in latencies])
        n = args.concurrency
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            each = list(pool.map(one, range(100, 100 + n)))
        wall = time.perf_counter() - t0
        res.record(f"ours:{n}", wall_s=round(wall, 3), images_per_s=round(n / wall, 4),
                   latency_s=[round(x, 3) for x in each])
    finally:
        stop_server(proc)


def bench_diffusers(ckpt: Path, args: argparse.Namespace, res: Results) -> None:
    import torch
    from diffusers import GlmImagePipeline

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    pipe = GlmImagePipeline.from_pretrained(str(ckpt), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(x) for x in args.size.split("x"))

    def one(i: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt=PROMPTS[i % len(PROMPTS)], height=height, width=width, num_inference_steps=args.steps,
             generator=torch.Generator("cpu").manual_seed(i))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # Warm-up (kernel selection, allocator); a smaller --diffusers-warmup-size saves a full AR run.
    wh = args.diffusers_warmup_size or args.size
    w, h = (int(x) for x in wh.split("x"))
    pipe(prompt=PROMPTS[0], height=h, width=w, num_inference_steps=2 if wh != args.size else args.steps,
         generator=torch.Generator("cpu").manual_seed(0))
    latencies = [one(i) for i in range(1, 1 + (args.diffusers_repeats or args.repeats))]
    lat = statistics.median(latencies)
    res.record("diffusers:1", latency_s=round(lat, 3), images_per_s=round(1 / lat, 4),
               runs=[round(x, 3) for x in latencies])
    del pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/glm-image-full", help="checkpoint dir (written if missing)")
    ap.add_argument("--preset", default="full", choices=("full", "tiny"))
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2, help="timed single requests (median)")
    ap.add_argument("--diffusers-repeats", type=int, default=None, help="timed diffusers calls (default --repeats)")
    ap.add_argument("--diffusers-warmup-size", default=None, help="WIDTHxHEIGHT of diffusers' warm-up call (default --size)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--ar-gpu-util", type=float, default=0.4, help="the AR engine's gpu_memory_utilization")
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--parts", default="ours,diffusers")
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU build (tiny preset)")
    ap.add_argument("--out")
    args = ap.parse_args()

    ckpt = ensure_checkpoint(Path(args.ckpt), args.preset, "cpu" if args.cpu else "cuda")
    meta = {"size": args.size, "steps": args.steps, "preset": args.preset, "concurrency": args.concurrency}
    try:
        import torch

        meta["device"] = "cpu" if args.cpu else torch.cuda.get_device_name()
    except (ImportError, RuntimeError, AssertionError):
        meta["device"] = "?"
    res = Results(args.out, meta)
    parts = args.parts.split(",")
    if "ours" in parts:
        bench_ours(ckpt, args, res)
    if "diffusers" in parts:
        bench_diffusers(ckpt, args, res)

    r = res.results
    print("\n| | latency (s) | images/s |\n|---|---|---|")
    for key in (k for k in r if ":" in k and not k.endswith("startup")):
        print(f"| {key} | {r[key].get('latency_s', r[key].get('wall_s'))} | {r[key]['images_per_s']} |")
    if "ours:1" in r and "diffusers:1" in r:
        print(f"\nspeed-up per image: {r['diffusers:1']['latency_s'] / r['ours:1']['latency_s']:.2f}x (target >= 2x)")
    if "ours:1" in r and f"ours:{args.concurrency}" in r:
        gain = r[f"ours:{args.concurrency}"]["images_per_s"] / r["ours:1"]["images_per_s"]
        print(f"{args.concurrency} concurrent vs one at a time: {gain:.2f}x images/s (target >= 3x)")


if __name__ == "__main__":
    main()
