"""The diffusion engine runs in its own process under `vllm serve --omni` (engine/).

Real server, real openai client, real engine-core process on the tiny Qwen-Image: killing that
process mid-request ends the request with a 503 naming the stage, /health and /metrics show the
engine down and restarting, and the restarted engine serves the next request with the same
pixels as before the crash.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import psutil
import pytest
import requests

from .conftest import first_image_md5

pytestmark = pytest.mark.engine


def engine_pids(server) -> list[int]:
    """The server's engine-core processes (children running `python -m vllm_omni_plugin.engine.core`)."""
    out = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "vllm_omni_plugin.engine.core" in child.cmdline():
                out.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_engine_mid_request(server, pid: int, request) -> dict:
    """Run `request()` on a thread, SIGKILL engine process `pid` once the request runs in it, and
    return what the request ended with: {"result": ...} or {"error": the exception}."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = request()
        except Exception as e:  # noqa: BLE001 -- the caller asserts on it
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: server.metrics()["omni_engine_requests_running"] >= 1, 60, "the request to run")
    os.kill(pid, signal.SIGKILL)
    worker.join(90)
    assert not worker.is_alive(), "the request in the killed engine did not end"
    return outcome


def test_engine_runs_in_its_own_process(omni_server):
    server = omni_server("qwen-image")
    (pid,) = engine_pids(server)
    assert pid != server.proc.pid
    assert server.metrics()["omni_engine_alive"] == 1
    log = server.log.read_text()
    # The client logs what the engine process reported about itself when it was ready: a warning
    # if anything there had imported vLLM (principle 3; tests/diffusion/test_engine_client.py
    # checks the flag itself).
    assert f"diffusion stage engine process pid {pid} is ready" in log
    assert "the diffusion engine process imported vLLM" not in log


def test_killed_engine_is_a_503_naming_the_stage_then_restarted(omni_server):
    # A server of its own: the failed request and the restart would show in the shared one's metrics.
    server = omni_server("qwen-image", variant="engine-kill")
    client = server.client()
    probe = dict(prompt="a lighthouse", extra_body={"seed": 11})
    before_md5 = first_image_md5(client.images.generate(**probe))
    (pid,) = engine_pids(server)
    restarts = server.metrics()["omni_engine_restarts"]

    failed = kill_engine_mid_request(server, pid, lambda: client.images.generate(
        prompt="a long one", extra_body={"seed": 1, "num_inference_steps": 200}))

    err = failed["error"]
    assert isinstance(err, openai.APIStatusError), err
    body = err.response.json()["error"]
    assert err.status_code == 503 and body["code"] == 503 and body["type"] == "ServiceUnavailableError"
    assert "diffusion stage's engine process died" in body["message"] and str(pid) in body["message"]

    # While the engine process restarts: /health and the metrics say so, new requests get a 503.
    health = requests.get(server.url + "/health", timeout=10)
    if health.status_code == 503:  # (unless the restart already finished)
        assert "restarting" in health.json()["error"]["message"]
        assert server.metrics()["omni_engine_alive"] == 0
    wait_for(lambda: requests.get(server.url + "/health", timeout=10).status_code == 200, 240, "the restart")
    m = server.metrics()
    assert m["omni_engine_alive"] == 1 and m["omni_engine_restarts"] == restarts + 1
    (new_pid,) = engine_pids(server)
    assert new_pid != pid

    # The restarted engine serves, the same pixels as before the crash.
    assert first_image_md5(client.images.generate(**probe)) == before_md5
    assert server.metrics()["omni_engine_requests_in_flight"] == 0
