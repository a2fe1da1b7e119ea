"""Run a benchmark: arrivals, warm-ups, the progress bar, and the server's /metrics around the run.

Arrivals follow `vllm bench serve`: requests are released at `request_rate` per second with
exponential (Poisson) gaps -- all at once when the rate is infinite -- and at most
`max_concurrency` are outstanding at any time (unbounded when None). Fixed concurrency is
`--request-rate inf --max-concurrency C`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from .prompts import load_prompts
from .summary import scrape_engine_metrics, summarize
from .workloads import TASKS, WORKLOADS, RequestResult, Workload, timed_request


@dataclass
class BenchConfig:
    """One benchmark run. Field meanings are the `vllm-omni bench` flags of the same names."""

    base_url: str
    task: str = "images"
    model: str | None = None  # None: the first model of GET /v1/models
    api_key: str | None = None
    num_prompts: int = 16
    max_concurrency: int | None = None
    request_rate: float = math.inf
    prompts_file: str | None = None
    seed: int = 0
    size: str | None = None
    steps: int | None = None
    n: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    num_warmups: int = 0
    timeout_s: float = 600.0
    poll_interval_s: float = 0.5
    ready_check_timeout_s: float = 60.0
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    detailed: bool = False
    disable_tqdm: bool = False
    #: images / edits: `stream: true` with this many partial images (None: no stream)
    partial_images: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be at least 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf: all requests at once)")
        if self.partial_images is not None and self.task not in ("images", "edits"):
            raise ValueError("--stream is for the images and edits tasks (the routes that stream)")


class ServerNotReady(RuntimeError):
    """The server did not answer GET /health with 200 within the ready-check timeout."""


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each of `n` requests: 0 for an infinite rate, else exponential gaps of
    mean 1/rate (a Poisson process), drawn from `seed` so two runs release requests alike."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0  # the first request goes at once
    return gaps.tolist()


async def _wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            r = await client.get("/health")
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"{client.base_url} is not ready after {timeout_s:g} s ({last})")
        await asyncio.sleep(0.5)


async def _first_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _run(config: BenchConfig) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limit = config.max_concurrency or config.num_prompts
    limits = httpx.Limits(max_connections=limit + 2, max_keepalive_connections=limit + 2)
    async with httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s, connect=30.0)) as client:
        await _wait_ready(client, config.ready_check_timeout_s)
        model = config.model or await _first_model(client)
        workload: Workload = WORKLOADS[config.task](
            model=model, size=config.size, steps=config.steps, n=config.n, extra_body=config.extra_body,
            image=config.image, poll_interval_s=config.poll_interval_s, detailed=config.detailed,
            partial_images=config.partial_images)
        prompts = load_prompts(config.prompts_file)

        # Warm-ups: one after another, seeds below the timed run's, results dropped.
        for i in range(config.num_warmups):
            await timed_request(workload, config.task, client, -1 - i, prompts[i % len(prompts)],
                                config.seed - 1 - i, time.perf_counter())
        before = await scrape_engine_metrics(client)
        results = await _timed(config, workload, client, prompts)
        duration = max(r.start_s + r.latency_s for r in results)
        after = await scrape_engine_metrics(client)
    return summarize(config, model, results, duration, before, after)


async def _timed(config: BenchConfig, workload: Workload, client: httpx.AsyncClient,
                 prompts: list[str]) -> list[RequestResult]:
    from tqdm.auto import tqdm

    gate = asyncio.Semaphore(config.max_concurrency or config.num_prompts)
    bar = tqdm(total=config.num_prompts, desc=f"omni bench {config.task}", unit="req", disable=config.disable_tqdm)
    t0 = time.perf_counter()

    async def one(i: int) -> RequestResult:
        async with gate:
            result = await timed_request(workload, config.task, client, i, prompts[i % len(prompts)],
                                         config.seed + i, t0)
        bar.update(1)
        return result

    tasks = []
    for i, gap in enumerate(arrival_gaps(config.num_prompts, config.request_rate, config.seed)):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(i)))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        bar.close()


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run one benchmark against a running server.

    Args:
        config: the run (server URL, task, load shape, request fields).

    Returns:
        the summary, in the `--save-result` schema (summary.SCHEMA; docs/bench.md).

    Raises:
        ServerNotReady: /health did not answer 200 within `config.ready_check_timeout_s`.
    """
    return asyncio.run(_run(config))
