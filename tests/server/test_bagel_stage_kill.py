"""Stages fail alone: the BAGEL AR stage's engine process killed mid-request.

The request it was serving fails with a 503 naming the AR stage, /health says
the stage died and is being restarted, requests meanwhile get the same clear
503, and once the server has restarted the stage text and image requests run
again. Runs after test_bagel_server.py on the same server (it restarts the
stage, so it goes last among the BAGEL tests).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import psutil
import pytest
import requests

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


def test_ar_engine_killed_mid_request_fails_that_request_then_the_stage_restarts(omni_server):
    server = omni_server("bagel")
    assert chat(server, 2).status_code == 200
    core = engine_core(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, server, 400)
        time.sleep(1.0)  # the request is in the AR engine, generating
        assert not running.done(), running.result().text
        core.send_signal(signal.SIGKILL)
        failed = running.result(timeout=60)
    assert failed.status_code == 503, failed.text
    err = failed.json()["error"]
    assert "AR stage" in err["message"] and "died" in err["message"] and err["code"] == 503, err

    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and "AR stage" in health.json()["error"]["message"], health.text
    meanwhile = chat(server, 2, timeout=30)
    assert meanwhile.status_code == 503 and "AR stage" in meanwhile.json()["error"]["message"], meanwhile.text

    deadline = time.monotonic() + 240
    while requests.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the AR stage was not restarted within 240 s"
        assert server.proc.poll() is None, "the server exited"
        time.sleep(1.0)
    assert engine_core(server).pid != core.pid

    again = chat(server, 4)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4, again.text
    image = requests.post(server.url + "/v1/images/generations", headers=server.headers(), timeout=300,
                          json={"prompt": "a red square", "size": "32x32", "seed": 1})
    assert image.status_code == 200 and image.json()["data"][0]["b64_json"], image.text
