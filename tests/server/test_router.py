"""Diffusion replicas behind vLLM's router (`vllm-router`, power_of_two on each replica's
`/load`), sharing one PostgreSQL job store: requests spread over both replicas, a replica
killed mid-run, the router dropping it and taking it back, every video job still listed,
read, downloaded and deleted through the router.

vllm-router 0.1.17 forwards any path with a JSON body (and GET/DELETE), but answers a
multipart body with its own 400 ("Invalid JSON body"): clients behind it send JSON (image
URLs or data: URLs), which every omni route takes. The last test pins that down.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .conftest import API_KEY, Server, free_port, start_server, wait_healthy
from .postgres import postgres  # noqa: F401 -- fixture

pytestmark = pytest.mark.engine
ROUTER = Path(sys.executable).with_name("vllm-router")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Router:
    def __init__(self, workers: list[str], log: Path) -> None:
        if not ROUTER.exists() and shutil.which("vllm-router") is None:
            pytest.skip("vllm-router is not installed (pip install vllm-router; the test extra has it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(ROUTER if ROUTER.exists() else shutil.which("vllm-router")), "--host", "127.0.0.1",
               "--port", str(self.port), "--worker-urls", *workers, "--policy", "power_of_two",
               "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
               "--health-success-threshold", "1", "--request-timeout-secs", "300",
               # the key it sends to the workers (it drops the client's Authorization header)
               "--api-key", API_KEY]
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if wait_healthy(self.url, self.proc, log, 60):
            return
        self.stop()
        raise RuntimeError(f"router did not start:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def submitted(server: Server) -> float:
    return server.metrics()["omni_engine_requests_submitted"]


def replicas(family, checkpoint, tmp_path, store_url, n=2, extra=()) -> list[Server]:
    out = []
    for i in range(n):
        workdir = tmp_path / f"replica-{i}"
        workdir.mkdir()
        out.append(start_server(family, checkpoint(family), workdir, ["--omni-job-store", store_url, *extra]))
    return out


def kill(server: Server) -> None:
    server.proc.kill()
    server.proc.wait(30)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_image_replicas_spread_survive_a_kill_and_come_back(omni_server, checkpoint, postgres, tmp_path):  # noqa: F811
    omni_server.stop()  # this test runs servers of its own
    servers = replicas("qwen-image", checkpoint, tmp_path, postgres.url)
    router = Router([s.url for s in servers], tmp_path / "router.log")
    try:
        a, b = servers
        body = {"prompt": "a red square", "size": "64x64", "num_inference_steps": 40, "response_format": "b64_json"}
        before = [submitted(s) for s in servers]

        def generate(seed: int) -> requests.Response:
            return requests.post(router.url + "/v1/images/generations", json={**body, "seed": seed}, headers=AUTH,
                                 timeout=300)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(generate, range(8)))
        assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers]
        spread = [submitted(s) - n for s, n in zip(servers, before)]
        assert sum(spread) == 8 and min(spread) >= 1, spread  # load-aware, over both replicas
        # the router's answer is the replica's: one request (no batch companions), through the
        # router and directly to each replica, gives the same image bytes
        images = {requests.post(url + "/v1/images/generations", json={**body, "seed": 3}, headers=AUTH,
                                timeout=300).json()["data"][0]["b64_json"] for url in (router.url, a.url, b.url)}
        assert len(images) == 1

        # 8 more, and replica `a` killed while it runs some of them
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(generate, 100 + i) for i in range(8)]
            wait_until(lambda: requests.get(a.url + "/load", timeout=5).json()["server_load"] > 0, 60, "work on a")
            kill(a)
            answers = [f.result() for f in futures]
        for r in answers:  # every request ended: an image, or a clear error from the router
            assert r.status_code == 200 or (r.status_code >= 500 and r.text), (r.status_code, r.text[:300])
        failed = [r for r in answers if r.status_code != 200]
        print(f"\nkilled replica mid-run: {len(failed)} of 8 failed:", {r.status_code: r.text[:200] for r in failed})

        # the router stops sending to the dead replica: new requests all succeed on `b`
        time.sleep(3)
        ok_before = submitted(b)
        assert all(generate(200 + i).status_code == 200 for i in range(4))
        assert submitted(b) - ok_before == 4

        # `a` back on its port: the router takes it back
        a = servers[0] = start_server("qwen-image", checkpoint("qwen-image"), tmp_path / "replica-0",
                                      ["--omni-job-store", postgres.url], port=a.port)
        def a_gets_work() -> bool:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                assert all(r.status_code == 200 for r in pool.map(generate, range(300, 304)))
            return submitted(a) > 0
        wait_until(a_gets_work, 60, "the router to send to the restarted replica")
    finally:
        router.stop()
        for s in servers:
            s.stop()


def test_video_jobs_through_the_router_outlive_a_replica(omni_server, checkpoint, postgres, tmp_path):  # noqa: F811
    omni_server.stop()
    servers = replicas("wan2.2-t2v", checkpoint, tmp_path, postgres.url, extra=["--omni-video-retention", "3600"])
    router = Router([s.url for s in servers], tmp_path / "router.log")
    try:
        a, b = servers
        before = [submitted(s) for s in servers]
        jobs = []
        for i in range(6):  # short jobs and long ones (the long ones still run when `a` dies)
            steps = 2 if i < 2 else 120
            r = requests.post(router.url + "/v1/videos", json={"prompt": f"boat {i}", "seed": i,
                                                               "num_inference_steps": steps}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            jobs.append(r.json()["id"])
        spread = [submitted(s) - n for s, n in zip(servers, before)]
        assert sum(spread) == 6 and min(spread) >= 1, spread

        def listed() -> dict[str, dict]:
            r = requests.get(router.url + "/v1/videos", headers=AUTH, timeout=30)
            assert r.status_code == 200, r.text
            return {j["id"]: j for j in r.json()["data"]}

        assert set(jobs) <= set(listed())
        for vid in jobs:  # any replica answers for any job: the store is shared
            for server in servers:
                r = requests.get(f"{server.url}/v1/videos/{vid}", headers=AUTH, timeout=30)
                assert r.status_code == 200 and r.json()["id"] == vid
        wait_until(lambda: all(listed()[v]["status"] == "completed" for v in jobs[:2]), 120, "the short jobs")
        content = requests.get(f"{router.url}/v1/videos/{jobs[0]}/content", headers=AUTH, timeout=60)
        direct = requests.get(f"{b.url}/v1/videos/{jobs[0]}/content", headers=AUTH, timeout=60)
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        assert content.content == direct.content and content.content[4:8] == b"ftyp"

        wait_until(lambda: requests.get(a.url + "/load", timeout=5).json()["server_load"] > 0, 60, "work on a")
        kill(a)
        # until its next health check (1 s here) the router may still pick `a` for a GET and answer
        # its own 502 (docs/server.md); the listing is read once the router has dropped it
        time.sleep(3)
        # no job disappears: a's running jobs fail with the reason (b notices its silence),
        # b's finish; the listing through the router keeps all of them
        settled = wait_until(
            lambda: (lambda j: j if all(j[v]["status"] in ("completed", "failed") for v in jobs) else None)(listed()),
            240, "every job to settle")
        assert set(jobs) <= set(settled)
        failed = [settled[v] for v in jobs if settled[v]["status"] == "failed"]
        assert failed, "replica a ran long jobs when it was killed"
        for job in failed:
            assert job["error"]["code"] == "server_stopped" and "stopped before it finished" in job["error"]["message"]
        # a job DELETEd through the router goes away on every replica
        for vid in jobs:
            r = requests.delete(f"{router.url}/v1/videos/{vid}", headers=AUTH, timeout=60)
            assert r.status_code == 200 and r.json()["deleted"], r.text
        assert not set(jobs) & set(listed())
    finally:
        router.stop()
        for s in servers:
            s.stop()


def test_router_forwards_json_with_its_own_key_and_refuses_multipart(tmp_path):
    """What vllm-router 0.1.17 does (an echo worker shows what arrives): a multipart body gets
    its own 400, nothing forwarded; the client's Authorization header is replaced by the
    router's --api-key. docs/server.md tells users both."""
    echo = tmp_path / "echo.py"
    echo.write_text(
        "import json, sys\nfrom http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self): self._answer()\n"
        "    def do_POST(self): self._answer()\n"
        "    def _answer(self):\n"
        "        n = int(self.headers.get('content-length') or 0); body = self.rfile.read(n)\n"
        "        out = json.dumps({'path': self.path, 'auth': self.headers.get('authorization'),\n"
        "                          'server_load': 0}).encode()\n"
        "        self.send_response(200); self.send_header('content-length', str(len(out))); self.end_headers()\n"
        "        self.wfile.write(out)\n"
        "    def log_message(self, *a): pass\n"
        "ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    ports = [free_port(), free_port()]
    workers = [subprocess.Popen([sys.executable, str(echo), str(p)]) for p in ports]
    router = None
    try:
        router = Router([f"http://127.0.0.1:{p}" for p in ports], tmp_path / "router.log")
        r = requests.post(router.url + "/v1/images/edits", json={"prompt": "x", "images": []}, timeout=10,
                          headers={"Authorization": "Bearer the-clients-own"})
        # forwarded, with the router's --api-key in place of the client's: the router itself checks no key
        assert r.status_code == 200 and r.json() == {"path": "/v1/images/edits", "auth": f"Bearer {API_KEY}",
                                                     "server_load": 0}
        r = requests.post(router.url + "/v1/videos", files={"prompt": (None, "x")}, timeout=10)
        assert r.status_code == 400 and "Invalid JSON body" in r.text, r.text
    finally:
        if router is not None:
            router.stop()
        for w in workers:
            w.kill()
            w.wait()
