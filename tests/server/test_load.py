"""Load on the text-to-image server (--omni-max-queue 2): overload at 4x the queue limit loses
nothing, and a soak of a few hundred mixed requests keeps the server's memory flat.

Figures (requests, statuses, lost, RSS) are printed; docs/server.md quotes them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time

import psutil
import pytest
import requests

pytestmark = pytest.mark.engine

GEN = "/v1/images/generations"
QUEUE = 2  # the qwen-image test server's --omni-max-queue (conftest)


def generate(server, prompt: str, steps: int, **extra) -> requests.Response:
    body = {"prompt": prompt, "size": "32x32", "num_inference_steps": steps, **extra}
    return requests.post(server.url + GEN, json=body, headers=server.headers(), timeout=300)


def test_overload_at_4x_the_queue_limit_loses_nothing(omni_server):
    server = omni_server("qwen-image")
    before = server.metrics()
    sent = 4 * QUEUE
    statuses: collections.Counter = collections.Counter()
    for wave in range(3):
        with concurrent.futures.ThreadPoolExecutor(sent) as pool:
            answers = list(pool.map(lambda i: generate(server, f"overload {wave} {i}", 4, seed=i), range(sent)))
        for r in answers:
            statuses[r.status_code] += 1
            if r.status_code == 200:
                assert len(r.json()["data"]) == 1  # an accepted request completes with its image
            else:
                assert r.status_code in (429, 503), r.text
                assert "--omni-max-queue" in r.json()["error"]["message"]
        assert statuses[200] >= 1
    after = server.metrics()
    accepted, refused = statuses[200], statuses[429] + statuses[503]
    assert accepted + refused == 3 * sent  # every request got an answer
    delta = {k: after[f"omni_engine_requests_{k}"] - before[f"omni_engine_requests_{k}"]
             for k in ("submitted", "finished", "failed", "aborted", "rejected")}
    # nothing lost: what the engine accepted all finished, the rest was refused at the door
    assert delta == {"submitted": accepted, "finished": accepted, "failed": 0, "aborted": 0, "rejected": refused}
    assert after["omni_engine_requests_in_flight"] == 0
    print(f"\noverload: {3 * sent} requests in 3 waves of {sent} (queue {QUEUE}): {dict(statuses)}, lost 0")


def _soak_request(server, i: int) -> int:
    kind = i % 4
    if kind == 0:
        return generate(server, f"soak {i}", 1, seed=i).status_code
    if kind == 1:  # refused by validation
        return requests.post(server.url + GEN, json={"prompt": "x", "guidance_scale": "NaN", "n": i},
                             headers=server.headers(), timeout=60).status_code
    if kind == 2:  # refused at the JSON parser
        return requests.post(server.url + GEN, data=b"[" * (100 + i), timeout=60,
                             headers={**server.headers(), "Content-Type": "application/json"}).status_code
    return requests.get(server.url + "/v1/videos", headers=server.headers(), timeout=60).status_code


def _rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def test_soak_keeps_memory_flat(omni_server):
    server = omni_server("qwen-image")
    proc = psutil.Process(server.proc.pid)
    total, warmup = 400, 100
    counter = itertools.count()
    statuses: collections.Counter = collections.Counter()

    def run(n: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # within the queue limit: nothing refused
            statuses.update(pool.map(lambda _: _soak_request(server, next(counter)), range(n)))

    started = time.monotonic()
    run(warmup)
    rss_warm = _rss_mb(proc)
    run(total - warmup)
    rss_end = _rss_mb(proc)
    elapsed = time.monotonic() - started
    assert statuses == {200: total // 2, 400: total // 2}, statuses
    assert server.metrics()["omni_engine_requests_in_flight"] == 0
    print(f"\nsoak: {total} requests in {elapsed:.0f} s: {dict(statuses)}, lost 0; RSS after {warmup}: "
          f"{rss_warm:.0f} MB, after {total}: {rss_end:.0f} MB ({rss_end - rss_warm:+.1f} MB)")
    assert rss_end - rss_warm < 40, (rss_warm, rss_end)
