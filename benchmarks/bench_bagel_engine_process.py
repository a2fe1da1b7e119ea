"""What the DiT stage's own process costs a multi-stage model (CPU): tiny BAGEL served by two real
`vllm serve --omni` servers side by side in one run, the DiT stage on a thread of the server
(`--omni-engine thread`) vs in its own engine process (the default), interleaved per round.

    python benchmarks/bench_bagel_engine_process.py [--rounds 9] [--steps 3] [--size 64]

Per round and server (the order alternates between rounds): one text2img request
(/v1/images/generations) and one img2img request (/v1/images/edits), timed at the client; the
servers' own per-request lines (`omni request ...: ar_prefill, kv hand-over, dit, decode, total`)
give the stage split. Reports medians, the process-over-thread ratio of each, whether the two
servers' images are byte-identical, and the load average (the box may be shared).

Prints a table; JSON to $OUT/bench_bagel_engine_process.json when OUT is set.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import requests

FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens", "1024", "--seed", "0",
         "--served-model-name", "tiny-bagel"]
MODES = {"DiT on a thread (--omni-engine thread)": ["--omni-engine", "thread"],
         "DiT in its process (default)": []}
TIMINGS = re.compile(r"omni request (\S+): ar_prefill ([\d.]+)s, kv hand-over ([\d.]+)s \(.*?\), dit ([\d.]+)s, "
                     r"decode ([\d.]+)s, total ([\d.]+)s")


def _edit_png() -> bytes:
    from PIL import Image

    img = Image.new("RGB", (48, 32), (200, 30, 30))
    for x in range(0, 48, 6):
        for y in range(32):
            img.putpixel((x, y), (20, 200, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _md5(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return hashlib.md5(base64.b64decode(r.json()["data"][0]["b64_json"])).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up round)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.server.spawn import spawn_server

    work = Path(tempfile.mkdtemp(prefix="bench-bagel-engine-"))
    model = str(make_checkpoint("bagel", "tiny", work / "ckpt"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    size = f"{args.size}x{args.size}"
    gen = {"model": "tiny-bagel", "prompt": "a red cube on a table", "size": size, "seed": 3,
           "num_inference_steps": args.steps, "negative_prompt": "blurry", "response_format": "b64_json"}
    edit = {"model": "tiny-bagel", "prompt": "make it blue", "size": size, "seed": 4,
            "num_inference_steps": str(args.steps)}
    png = _edit_png()
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {m: {"text2img": [], "img2img": []} for m in MODES}
    md5s: dict[str, set[tuple[str, str]]] = {m: set() for m in MODES}
    with contextlib.ExitStack() as stack:
        servers = {m: stack.enter_context(spawn_server(model, [*FLAGS, *flags], log=work / f"server-{i}.log", env=env))
                   for i, (m, flags) in enumerate(MODES.items())}
        for round_no in range(args.rounds + 1):  # round 0 warms both up
            order = list(MODES) if round_no % 2 else list(reversed(MODES))
            for mode in order:
                url = servers[mode].url
                started = time.perf_counter()
                t2i = _md5(requests.post(url + "/v1/images/generations", json=gen, timeout=600))
                middle = time.perf_counter()
                i2i = _md5(requests.post(url + "/v1/images/edits", data=edit, timeout=600,
                                         files={"image": ("edit.png", png, "image/png")}))
                ended = time.perf_counter()
                md5s[mode].add(("text2img", t2i))
                md5s[mode].add(("img2img", i2i))
                if round_no:
                    times[mode]["text2img"].append(middle - started)
                    times[mode]["img2img"].append(ended - middle)
        stage_split = {}
        for mode, server in servers.items():
            rows = [tuple(map(float, m.groups()[1:])) for m in TIMINGS.finditer(server.log.read_text())]
            rows = rows[2:]  # (the warm-up round's two requests left out)
            stage_split[mode] = {k: statistics.median(r[i] for r in rows)
                                 for i, k in enumerate(("ar_prefill", "kv_handover", "dit", "decode", "total"))}
    load_after = os.getloadavg()
    thread, process = MODES
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    result = {
        "median_e2e_s": med,
        "process_over_thread": {k: med[process][k] / med[thread][k] for k in ("text2img", "img2img")},
        "stage_split_median_s": stage_split,
        "identical_images": md5s[thread] == md5s[process] and len(md5s[thread]) == 2,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rounds": args.rounds,
        "steps": args.steps,
        "size": size,
    }
    print(f"\n| tiny BAGEL {size}, {args.steps} steps, served | text2img median (s) | img2img median (s) | "
          "dit stage median (s) | kv hand-over median (s) |")
    print("|---|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | {med[m]['text2img']:.3f} | {med[m]['img2img']:.3f} | {stage_split[m]['dit']:.3f} | "
              f"{stage_split[m]['kv_handover']:.4f} |")
    r = result["process_over_thread"]
    print(f"\nprocess / thread: text2img {r['text2img']:.3f}, img2img {r['img2img']:.3f}; "
          f"identical images: {result['identical_images']}; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
          f"(1 min), {args.rounds} rounds")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_bagel_engine_process.json").write_text(json.dumps(result, indent=2))
    return 0 if result["identical_images"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
