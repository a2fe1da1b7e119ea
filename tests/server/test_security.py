"""--api-key guards every omni route as it guards vLLM's own; video ids cannot
address files outside the server's storage; the omni flags are in --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.engine

ROUTES = [
    ("post", "/v1/images/generations"),
    ("post", "/v1/images/edits"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/videos"),
    ("get", "/v1/videos"),
    ("get", "/v1/videos/video_00000000000000000000000000000000"),
    ("get", "/v1/videos/video_00000000000000000000000000000000/content"),
    ("delete", "/v1/videos/video_00000000000000000000000000000000"),
    ("get", "/v1/models"),
]


@pytest.mark.parametrize("method,path", ROUTES)
def test_api_key_guards_routes(omni_server, method, path):
    server = omni_server("qwen-image")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.request(method, server.url + path, json={"prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)


def test_health_and_metrics_are_open(omni_server):
    server = omni_server("qwen-image")
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert "omni_engine_queue_length" in requests.get(server.url + "/metrics", timeout=10).text


@pytest.mark.parametrize(
    "video_id", ["..%2F..%2F..%2Fetc%2Fpasswd", "..", "video_../../x", "%2Fetc%2Fpasswd", "video_" + "g" * 32]
)
def test_video_ids_cannot_escape_storage(omni_server, video_id):
    server = omni_server("qwen-image")
    for method, suffix in (("get", ""), ("get", "/content"), ("delete", "")):
        r = requests.request(method, f"{server.url}/v1/videos/{video_id}{suffix}", headers=server.headers(), timeout=10)
        assert r.status_code == 404, (video_id, suffix, r.status_code, r.text[:200])


def test_omni_flags_in_help():
    vllm = Path(sys.executable).with_name("vllm")
    out = subprocess.run([str(vllm), "serve", "--omni", "--help=Omni"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--omni-max-pixels", "--omni-max-frames", "--omni-max-n", "--omni-max-steps", "--omni-max-queue",
                 "--stage-configs-path", "--default-sampling-params", "--omni-video-dir", "--omni-video-retention",
                 "--omni-job-store"):
        assert flag in out.stdout
