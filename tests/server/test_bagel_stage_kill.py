"""Stages fail alone: the BAGEL DiT stage's and AR stage's engine processes killed mid-request.

The DiT stage runs in its own engine process behind the engine client (engine/client.py), as a
diffusion-only model's engine does: killed mid-request, that request ends with a 503 naming the
stage, /health and /metrics show it down, the client restarts it and the next request is served
with the same pixels as before the crash.

On `vllm serve --omni` the AR engine is the engine client of vLLM's own API
server, so vLLM's rules apply to it: the text request it was serving fails with
vLLM's own answer (an OpenAI error body naming the EngineCore; vLLM 0.32 sends
500 "EngineCore encountered an issue"), and the server stops with its engine (as plain `vllm serve` does;
a supervisor restarts the process). With VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 the
server stays up: /health answers 503 and the omni image route answers a clear
503 naming the AR stage, never a 500 or a hang. (Offline `Omni` restarts an
engine it started itself: families/bagel/orchestrator.py.)
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import time

import psutil
import pytest
import requests

from .conftest import first_image_md5
from .test_engine_process import engine_pids, kill_engine_mid_request, wait_for

pytestmark = pytest.mark.engine

CHAT = "/v1/chat/completions"


def engine_core(server) -> psutil.Process:
    """The AR stage's vLLM EngineCore process (a child of the server, titled VLLM::EngineCore)."""
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCor" in child.name():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no EngineCore process under the server")


def chat(server, tokens: int, timeout: float = 300) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "count to a thousand"}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 0.0}
    return requests.post(server.url + CHAT, json=body, headers=server.headers(), timeout=timeout)


def assert_vllm_engine_error(r: requests.Response) -> None:
    """vLLM's chat handler's answer for a dead engine: its status (500 in vLLM 0.32; 503 in some
    versions), an OpenAI error body whose message names the EngineCore."""
    assert r.status_code in (500, 503), r.text
    err = r.json()["error"]
    assert err["code"] == r.status_code and "EngineCore" in err["message"], err


def kill_mid_request(server) -> requests.Response:
    """Kill the AR EngineCore while a chat request is generating; that request's response."""
    assert chat(server, 2).status_code == 200
    core = engine_core(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, server, 400)
        time.sleep(1.0)  # the request is in the AR engine, generating
        assert not running.done(), running.result().text
        core.send_signal(signal.SIGKILL)
        return running.result(timeout=60)


def test_dit_engine_process_killed_mid_request_is_a_503_naming_the_stage_then_restarted(omni_server):
    server = omni_server("bagel")  # (the BAGEL server tests' own)
    (pid,) = engine_pids(server)
    assert f"dit stage engine process pid {pid} is ready" in server.log.read_text()
    client = server.client()
    probe = dict(prompt="a lighthouse", size="32x32", extra_body={"seed": 11})
    before_md5 = first_image_md5(client.images.generate(**probe))
    before = server.metrics()
    # 8 images with text CFG, 200 steps: running for a long while
    slow = {"prompt": "slow", "num_inference_steps": 200, "n": 8, "negative_prompt": "fast", "seed": 1}
    r = kill_engine_mid_request(server, pid, lambda: requests.post(
        server.url + "/v1/images/generations", headers=server.headers(), timeout=120, json=slow))["result"]
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == 503 and err["type"] == "ServiceUnavailableError", err
    assert "dit stage's engine process died" in err["message"] and str(pid) in err["message"], err

    health = requests.get(server.url + "/health", timeout=10)
    if health.status_code == 503:  # (unless the restart already finished)
        assert "dit stage" in health.json()["error"]["message"] and server.metrics()["omni_engine_alive"] == 0
    wait_for(lambda: requests.get(server.url + "/health", timeout=10).status_code == 200, 240, "the restart")
    m = server.metrics()
    assert m["omni_engine_alive"] == 1 and m["omni_engine_restarts"] == before["omni_engine_restarts"] + 1
    assert m["omni_engine_requests_failed"] == before["omni_engine_requests_failed"] + 1
    (new_pid,) = engine_pids(server)
    assert new_pid != pid
    assert first_image_md5(client.images.generate(**probe)) == before_md5  # served again, the same pixels
    assert server.metrics()["omni_engine_requests_in_flight"] == 0


def test_ar_engine_killed_mid_request_fails_that_request_and_the_stage_reports_it(omni_server):
    # max_new_tokens: vLLM caps a chat's max_tokens by the generation config (the stage's default is 8)
    server = omni_server("bagel", variant="keep-alive", env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"},
                         extra=["--override-generation-config", '{"max_new_tokens": 1000}'])
    failed = kill_mid_request(server)
    assert_vllm_engine_error(failed)

    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 503, health.text
    image = requests.post(server.url + "/v1/images/generations", headers=server.headers(), timeout=60,
                          json={"prompt": "a red square", "size": "32x32", "seed": 1})
    assert image.status_code == 503, image.text
    err = image.json()["error"]
    assert "AR stage" in err["message"] and "died" in err["message"] and err["code"] == 503, err
    assert server.proc.poll() is None, "the server exited although VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1"
    server.stop()


def test_without_keep_alive_the_server_stops_with_its_ar_engine(omni_server):
    server = omni_server("bagel")
    assert chat(server, 2).status_code == 200
    engine_core(server).send_signal(signal.SIGKILL)
    time.sleep(2.0)  # vLLM's engine monitor marks the client errored
    assert_vllm_engine_error(chat(server, 2, timeout=60))
    try:
        server.proc.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running after its AR engine died")
