"""The `vllm-omni bench` flags and command (names follow `vllm bench serve` where they mean the same)."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

from .runner import BenchConfig, run_bench
from .summary import format_summary
from .workloads import TASKS


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench flags to `parser`; returns it."""
    p = parser
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--task", choices=TASKS, default="images",
                   help="images: /v1/images/generations; edits: /v1/images/edits; chat: /v1/chat/completions "
                   "asking for images; videos: /v1/videos create + poll + download")
    p.add_argument("--model", default=None, help="model name in requests (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=16, help="timed requests")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests outstanding at once")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once, bounded by --max-concurrency)")
    p.add_argument("--prompts-file", default=None,
                   help="prompts: .txt one per line, or .jsonl {\"prompt\": ...} (default: the built-in set)")
    p.add_argument("--seed", type=int, default=0, help="request i gets seed SEED+i; also seeds the arrivals")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the server's)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the server's)")
    p.add_argument("--n", type=int, default=None, help="images per request")
    p.add_argument("--extra-body", type=json.loads, default={},
                   help="JSON object merged into every request body, e.g. '{\"num_frames\": 9}'")
    p.add_argument("--image", default=None,
                   help="input image file: edits (default: a built-in 64x64 test image), chat (none by default)")
    p.add_argument("--stream", action="store_true",
                   help="images / edits: ask for server-sent events (stream: true) and time the first partial image")
    p.add_argument("--partial-images", type=int, default=None, choices=range(4), metavar="{0..3}",
                   help="partial images per request with --stream (default 2)")
    p.add_argument("--num-warmups", type=int, default=0, help="untimed requests sent first, one at a time")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one HTTP call may take")
    p.add_argument("--poll-interval", type=float, default=0.5, help="videos: seconds between status polls")
    p.add_argument("--ready-check-timeout-sec", type=float, default=60.0,
                   help="wait this long for GET /health to answer 200 before starting")
    p.add_argument("--metric-percentiles", default="50,90,99", help="latency percentiles to report")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--save-result", action="store_true", help="write the summary as JSON (docs/bench.md: schema)")
    p.add_argument("--save-detailed", action="store_true",
                   help="with --save-result: add one record per request (latency, error, request id, output md5s, "
                   "resolved parameters)")
    p.add_argument("--result-dir", default=".", help="folder of the result file")
    p.add_argument("--result-filename", default=None,
                   help="default: omni-bench-TASK-cCONCURRENCY-rRATE-YYYYmmdd-HHMMSS.json")
    p.set_defaults(func=bench_main)
    return p


def default_edit_image() -> bytes:
    """A 64x64 PNG with structure (red, green stripes every 6 px, a blue square): the edits input
    when no --image is given."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    draw = ImageDraw.Draw(img)
    for x in range(0, 64, 6):
        draw.line([(x, 0), (x, 63)], fill=(20, 200, 40))
    draw.rectangle([20, 20, 43, 43], fill=(30, 40, 210))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` of parsed `vllm-omni bench` flags."""
    image = Path(args.image).read_bytes() if args.image else (default_edit_image() if args.task == "edits" else None)
    return BenchConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        task=args.task, model=args.model, api_key=args.api_key, num_prompts=args.num_prompts,
        max_concurrency=args.max_concurrency, request_rate=args.request_rate, prompts_file=args.prompts_file,
        seed=args.seed, size=args.size, steps=args.steps, n=args.n, extra_body=args.extra_body, image=image,
        num_warmups=args.num_warmups, timeout_s=args.timeout, poll_interval_s=args.poll_interval,
        ready_check_timeout_s=args.ready_check_timeout_sec,
        percentiles=tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip()),
        detailed=args.save_detailed, disable_tqdm=args.disable_tqdm,
        partial_images=(2 if args.partial_images is None else args.partial_images) if args.stream else None,
    )


def bench_main(args: argparse.Namespace) -> int:
    """Run `vllm-omni bench`; prints the summary table (and the result path with --save-result).

    Returns:
        0 when at least one request succeeded, 1 when none did.
    """
    if not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    if args.partial_images is not None and not args.stream:
        raise ValueError("--partial-images needs --stream")
    config = config_from_args(args)
    summary = run_bench(config)
    print(format_summary(summary))
    if args.save_result:
        name = args.result_filename or "omni-bench-{task}-c{c}-r{r}-{date}.json".format(
            task=config.task, c=config.max_concurrency or "inf", r=f"{config.request_rate:g}",
            date=summary["date"][:19].replace("-", "").replace(":", "").replace("T", "-"))
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"result: {path}")
    if summary["completed"] == 0:
        print(f"no request succeeded (errors: {summary['errors']})", file=sys.stderr)
        return 1
    return 0
