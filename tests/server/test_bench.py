"""`vllm-omni bench` against real servers: what it reports is what the server did.

Oracles: a bench request's decoded pixels equal the openai client's answer for the same prompt and
seed (the bench sends what it says it sends); the server's own /metrics count the requests the bench
reports; a queue limit the server enforces shows up as 503s under "errors"; the server counts the video jobs
and downloads the bench reports.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess

import pytest
import requests
from PIL import Image

from vllm_omni_plugin.bench.prompts import BUILTIN_PROMPTS
from vllm_omni_plugin.bench.summary import SCHEMA

from .conftest import API_KEY, OMNI_CLI, png_bytes, striped_image

pytestmark = pytest.mark.engine


def _bench(server, tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "result.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(OMNI_CLI), "bench", "--base-url", server.url, "--api-key", API_KEY, "--disable-tqdm",
         "--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", out.name, *flags],
        capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _rgb_md5(b64: str) -> str:
    return hashlib.md5(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()).hexdigest()


def _route_requests(server, route: str, status: str = "200") -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    key = f'omni_requests_total{{route="{route}",status="{status}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))


def test_bench_edits_upload_matches_client(omni_server, tmp_path):
    server = omni_server("qwen-image-edit")
    png = png_bytes(striped_image(48, 40))
    (tmp_path / "in.png").write_bytes(png)
    proc, result = _bench(server, tmp_path, "--task", "edits", "--image", str(tmp_path / "in.png"),
                          "--num-prompts", "2", "--max-concurrency", "1", "--size", "64x64", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert (result["completed"], result["failed"], result["outputs"]) == (2, 0, 2)
    ref = server.client().images.edit(image=("in.png", png, "image/png"), prompt=BUILTIN_PROMPTS[1], size="64x64",
                                      extra_body={"seed": 4})
    assert result["requests"][1]["output_md5"] == [_rgb_md5(ref.data[0].b64_json)]
    assert result["requests"][1]["resolved"] == ref.model_extra["omni"]["resolved"]


def test_bench_images_summary_metrics_and_pixels(omni_server, tmp_path):
    server = omni_server("qwen-image")
    before = _route_requests(server, "images.generations")
    # one at a time: a batched step may differ from a lone one by a rounding (<= 1 uint8 level,
    # tests/diffusion/test_engine.py), and the pixels are compared bit for bit below
    proc, result = _bench(server, tmp_path, "--num-prompts", "4", "--max-concurrency", "1", "--seed", "5",
                          "--num-warmups", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Omni Serving Benchmark Result" in proc.stdout and "P99 latency (ms)" in proc.stdout
    assert result["schema"] == SCHEMA and result["task"] == "images" and result["model"] == "tiny-qwen-image"
    assert (result["completed"], result["failed"], result["outputs"], result["errors"]) == (4, 0, 4, {})
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["requests_per_s"] == pytest.approx(4 / result["duration_s"], rel=1e-3)
    assert result["streaming"] is False and result["time_to_first_partial_image_ms"] is None
    # the server counted the warm-up and the 4 timed requests; in the timed run its engine ran the
    # 2 steps (the stage default) of each request alone
    assert _route_requests(server, "images.generations") - before == 5
    assert result["server"]["engine_steps"] == 8 and result["server"]["mean_requests_per_step"] == 1.0
    # request 2: the built-in prompt 2, seed 5 + 2 -- the same pixels as the openai client's answer
    req = result["requests"][2]
    assert req["resolved"]["seed"] == 7 and req["resolved"]["prompt"] == BUILTIN_PROMPTS[2]
    ref = server.client().images.generate(model="tiny-qwen-image", prompt=BUILTIN_PROMPTS[2], extra_body={"seed": 7})
    assert req["output_md5"] == [_rgb_md5(ref.data[0].b64_json)]


def test_bench_streams_and_times_the_first_partial_image(omni_server, tmp_path):
    server = omni_server("qwen-image")
    proc, result = _bench(server, tmp_path, "--stream", "--partial-images", "2", "--steps", "4", "--num-prompts", "2",
                          "--max-concurrency", "1", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert (result["completed"], result["outputs"], result["streaming"], result["partial_images"]) == (2, 2, True, 2)
    ttfp, lat = result["time_to_first_partial_image_ms"], result["latency_ms"]
    assert 0 < ttfp["min"] and ttfp["max"] < lat["max"] and "Time to first partial image (ms)" in proc.stdout
    assert all(0 < r["ttfp_s"] < r["latency_s"] for r in result["requests"])
    # the completed image of a streamed request is the unstreamed answer's (seed 5 + 1, prompt 1)
    ref = server.client().images.generate(prompt=BUILTIN_PROMPTS[1], extra_body={"seed": 6, "num_inference_steps": 4})
    assert result["requests"][1]["output_md5"] == [_rgb_md5(ref.data[0].b64_json)]


def test_bench_errors_by_code(omni_server, tmp_path):
    server = omni_server("qwen-image")  # --omni-max-queue 2
    # six at once against a queue of two: the server refuses the overflow (503, "at capacity")
    proc, result = _bench(server, tmp_path, "--num-prompts", "6", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    assert result["completed"] >= 2 and result["errors"].get("503", 0) >= 1
    assert result["completed"] + result["errors"]["503"] == 6 and set(result["errors"]) == {"503"}
    assert "capacity" in result["error_examples"]["503"]
    # a size the server refuses: every request a 400, exit code 1
    proc, result = _bench(server, tmp_path, "--num-prompts", "2", "--size", "7x0")
    assert proc.returncode == 1 and "no request succeeded" in proc.stderr
    assert result["completed"] == 0 and result["errors"] == {"400": 2}


def test_bench_chat_poisson_and_prompt_file(omni_server, tmp_path):
    server = omni_server("qwen-image")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a blue house"}\n\n{"prompt": "a green tree"}\n')
    # a Poisson rate and a concurrency bound together (the server's queue holds 2)
    proc, result = _bench(server, tmp_path, "--task", "chat", "--num-prompts", "3", "--request-rate", "20",
                          "--max-concurrency", "2", "--prompts-file", str(prompts))
    assert proc.returncode == 0, proc.stderr
    assert (result["completed"], result["outputs"], result["config"]["request_rate"]) == (3, 3, 20.0), result["errors"]
    assert [r["resolved"]["prompt"] for r in result["requests"]] == ["a blue house", "a green tree", "a blue house"]
    starts = [r["start_s"] for r in result["requests"]]
    assert starts == sorted(starts) and starts[-1] > 0  # released over time, not all at once


def test_bench_videos_create_poll_download(omni_server, tmp_path):
    server = omni_server("wan2.2-t2v")  # --omni-video-retention 6: a video is gone 6 s after it completes
    created, downloaded = _route_requests(server, "videos.create"), _route_requests(server, "videos.content")
    proc, result = _bench(server, tmp_path, "--task", "videos", "--num-prompts", "2", "--max-concurrency", "2",
                          "--poll-interval", "0.2", "--seed", "30")
    assert proc.returncode == 0, proc.stderr
    assert (result["completed"], result["output_unit"], result["outputs"]) == (2, "videos", 2)
    # the server created two jobs and served each mp4 once (the bench's downloads)
    assert _route_requests(server, "videos.create") - created == 2
    assert _route_requests(server, "videos.content") - downloaded == 2
    for i, req in enumerate(result["requests"]):
        assert req["request_id"].startswith("video") and req["resolved"]["seed"] == 30 + i
        assert len(req["output_md5"]) == 1 and req["latency_s"] > 0
    assert result["requests"][0]["output_md5"] != result["requests"][1]["output_md5"]  # two prompts, two seeds
