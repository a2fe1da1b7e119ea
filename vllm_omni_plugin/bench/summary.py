"""The benchmark summary: one dict, printed as a table and saved by `--save-result` as JSON.

Schema "vllm-omni-bench/1" (docs/bench.md lists every key). Latencies are milliseconds, like
`vllm bench serve`; throughputs are per second of the timed run (first request sent -> last
answer read; with --stream: the completed event read). `time_to_first_partial_image_ms`: the
percentiles of request sent -> first partial-image event, for a `--stream --partial-images K`
run with K > 0; null otherwise.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from .workloads import RequestResult

if TYPE_CHECKING:
    from .runner import BenchConfig

SCHEMA = "vllm-omni-bench/1"

# Unlabelled omni engine series read from /metrics before and after the timed run.
_ENGINE_SERIES = ("omni_engine_step_seconds_sum", "omni_engine_step_seconds_count",
                  "omni_engine_step_requests_sum", "omni_engine_step_requests_count")


async def scrape_engine_metrics(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The omni engine's step counters from GET /metrics, or None where it has none (not an omni
    server, or /metrics not reachable)."""
    try:
        r = await client.get("/metrics")
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    found: dict[str, float] = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in _ENGINE_SERIES:
            found[name] = float(value)
    return found if len(found) == len(_ENGINE_SERIES) else None


def _engine_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in _ENGINE_SERIES}
    steps = d["omni_engine_step_seconds_count"]
    return {
        "engine_steps": int(steps),
        "mean_step_ms": round(1000 * d["omni_engine_step_seconds_sum"] / steps, 3) if steps else None,
        "mean_requests_per_step": round(d["omni_engine_step_requests_sum"] / steps, 3) if steps else None,
    }


def _latency_ms(values: list[float], percentiles: tuple[float, ...]) -> dict[str, float | None]:
    keys = ["mean", "min", "max"] + [f"p{p:g}" for p in percentiles]
    if not values:
        return dict.fromkeys(keys)
    ms = np.asarray(values) * 1000.0
    out = {"mean": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max())}
    out.update({f"p{p:g}": float(np.percentile(ms, p)) for p in percentiles})
    return {k: round(v, 3) for k, v in out.items()}


def summarize(config: "BenchConfig", model: str, results: list[RequestResult], duration_s: float,
              before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """The summary of a timed run (the `--save-result` schema).

    Args:
        config: the run's configuration (echoed under "config").
        model: the model the requests named.
        results: one per request, in index order.
        duration_s: first request sent -> last answer read.
        before, after: `scrape_engine_metrics` around the timed run.

    Returns:
        the summary dict; "requests" (one dict per request) only for a detailed run.
    """
    ok = [r for r in results if r.ok]
    outputs = sum(r.outputs for r in ok)
    unit = "videos" if config.task == "videos" else "images"
    rate = None if math.isinf(config.request_rate) else config.request_rate
    ttfp = [r.ttfp_s for r in ok if r.ttfp_s is not None]
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_url": config.base_url,
        "model": model,
        "task": config.task,
        "config": {
            "num_prompts": config.num_prompts, "max_concurrency": config.max_concurrency, "request_rate": rate,
            "num_warmups": config.num_warmups, "seed": config.seed, "size": config.size, "steps": config.steps,
            "n": config.n, "extra_body": config.extra_body, "prompts_file": config.prompts_file,
            "input_image": config.image is not None,
        },
        "duration_s": round(duration_s, 6),  # the rates below are of this figure: keep it exact to 1 us
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "output_unit": unit,
        "outputs": outputs,
        "requests_per_s": round(len(ok) / duration_s, 4) if duration_s > 0 else None,
        "outputs_per_s": round(outputs / duration_s, 4) if duration_s > 0 else None,
        "latency_ms": _latency_ms([r.latency_s for r in ok], config.percentiles),
        "streaming": config.partial_images is not None,
        "partial_images": config.partial_images,
        "time_to_first_partial_image_ms": _latency_ms(ttfp, config.percentiles) if ttfp else None,
        "errors": dict(sorted(Counter(r.error_code for r in results if not r.ok).items())),
        "error_examples": {},
        "server": _engine_delta(before, after),
    }
    for r in results:
        if not r.ok and r.error_code not in summary["error_examples"]:
            summary["error_examples"][r.error_code] = (r.error or "")[:300]
    if config.detailed:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as the text table `vllm-omni bench` prints."""
    unit = s["output_unit"]
    rows = [
        ("Task", s["task"]), ("Model", s["model"]),
        ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
        ("Max concurrency", s["config"]["max_concurrency"] or "unbounded"),
        ("Request rate (req/s)", s["config"]["request_rate"] or "inf"),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        (f"Total {unit}", s["outputs"]),
        ("Request throughput (req/s)", _num(s["requests_per_s"])),
        (f"Output throughput ({unit}/s)", _num(s["outputs_per_s"])),
    ]
    for key, value in s["latency_ms"].items():
        rows.append((f"{key.capitalize() if key[0] != 'p' else key.upper()} latency (ms)", _num(value)))
    ttfp = s["time_to_first_partial_image_ms"]
    rows.append(("Time to first partial image (ms)", _num(ttfp.get("p50", ttfp["mean"]))
                 if ttfp else "n/a (no partial images asked: --stream --partial-images K)"))
    if s["server"]:
        rows += [("Engine steps", s["server"]["engine_steps"]),
                 ("Mean engine step (ms)", _num(s["server"]["mean_step_ms"])),
                 ("Mean requests per step", _num(s["server"]["mean_requests_per_step"]))]
    for code, count in s["errors"].items():
        rows.append((f"Errors {code}", f"{count}  e.g. {s['error_examples'][code][:80]}"))
    width = max(len(k) for k, _ in rows) + 2
    title = " Omni Serving Benchmark Result "
    lines = [title.center(width + 24, "=")] + [f"{k + ':':<{width}}{v}" for k, v in rows] + ["=" * (width + 24)]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"
