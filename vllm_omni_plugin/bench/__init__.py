"""`vllm-omni bench`: a load generator for a running omni server (in the spirit of `vllm bench serve`).

    prompts.py    the built-in prompt set and prompt files (.txt one per line, .jsonl {"prompt": ...})
    workloads.py  one class per task -- images, edits, videos, chat: the HTTP request it sends and how
                  its answer is read (outputs, request id, error code)
    runner.py     `BenchConfig` and `run_bench`: arrivals (fixed concurrency and/or a Poisson request
                  rate), warm-ups, the progress bar, the server's /metrics before and after
    summary.py    the summary (throughput, latency percentiles, errors by code) and its JSON schema
    cli.py        the `vllm-omni bench` flags

It talks HTTP only (httpx): it imports nothing from the server, so it runs from any machine that can
reach one. docs/bench.md documents the flags and the `--save-result` schema.
"""

from .runner import BenchConfig, run_bench
from .summary import SCHEMA

__all__ = ["BenchConfig", "run_bench", "SCHEMA"]
