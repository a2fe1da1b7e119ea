"""/v1/videos on tiny Wan2.2 T2V: job lifecycle, progress, mp4 frames equal to the
offline frames through the same export, deletion, retention, errors."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import numpy as np
import pytest
import requests

from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.server.routes.common import streaming_families

from .offline import comparable, offline

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]


def _frames_md5(mp4_path) -> list[str]:
    import av

    with av.open(str(mp4_path)) as container:
        return [hashlib.md5(np.ascontiguousarray(f.to_ndarray(format="rgb24")).tobytes()).hexdigest()
                for f in container.decode(video=0)]


def _frames(mp4_path) -> list[np.ndarray]:
    import av

    with av.open(str(mp4_path)) as container:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)]


def _wait(client, video_id, timeout=300):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        v = client.videos.retrieve(video_id)
        seen.append((v.status, v.progress))
        if v.status in ("completed", "failed"):
            return v, seen
        time.sleep(0.2)
    raise AssertionError(f"video {video_id} did not finish: {seen[-5:]}")


def stored_mp4(server, video_id: str) -> bytes | None:
    """The mp4 bytes the server's SQLite job store holds for a job (read beside the server)."""
    with sqlite3.connect(f"file:{server.extra['job_db']}?mode=ro", uri=True) as db:
        row = db.execute("SELECT content FROM omni_video_jobs WHERE id = ?", (video_id,)).fetchone()
    return None if row is None else row[0]


def test_video_matches_offline_then_expires(omni_server, checkpoint, tmp_path):
    server = omni_server("wan2.2-t2v")
    client = server.client()
    job = client.videos.create(prompt="a boat at sea", extra_body={"seed": 9, "negative_prompt": "blur"})
    assert job.status in ("queued", "in_progress") and job.id.startswith("video_")
    done, seen = _wait(client, job.id)
    assert done.status == "completed" and done.progress == 100, done
    assert done.size == "64x64"

    content = client.videos.download_content(job.id)
    served = tmp_path / "served.mp4"
    served.write_bytes(content.read())
    assert stored_mp4(server, job.id) == served.read_bytes()  # the job store holds the file

    off = offline(checkpoint, "wan2.2-t2v").generate("a boat at sea", SamplingParams(seed=9, negative_prompt="blur"))[0]
    assert done.model_extra["omni"]["resolved"] == comparable(off.params.public_dict())
    local = off.save_mp4(tmp_path / "offline.mp4")
    # Frames 1.. decode byte-identical; frame 0 (the I-frame) sometimes decodes differently in
    # the full suite (mean difference 0.6 and 1.7 levels seen; never when this test runs alone)
    # although the resolved params are equal -- an open finding. Ruled out in isolation: the
    # mp4 encoding (same bytes across processes, thread counts, CPU affinity, concurrent
    # threads) and the raw frames (same across processes, torch thread counts and earlier
    # requests of other sizes in one engine). So: exact where it holds, and a bound on frame 0
    # well below what a wrong seed or parameter gives (~15-20 levels on every frame).
    ours, theirs = _frames(served), _frames(local)
    assert len(ours) == len(theirs) == off.params.num_frames == 5
    assert _frames_md5(served)[1:] == _frames_md5(local)[1:]
    assert np.abs(ours[0] - theirs[0]).mean() < 4.0

    # retention (6 s on this server): the job and its file go away by themselves
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and stored_mp4(server, job.id) is not None:
        time.sleep(0.5)
    assert stored_mp4(server, job.id) is None
    r = requests.get(f"{server.url}/v1/videos/{job.id}", headers=server.headers())
    assert r.status_code == 404


def test_video_delete_and_errors(omni_server):
    server = omni_server("wan2.2-t2v")
    client = server.client()
    h = server.headers()
    job = client.videos.create(prompt="a slow one", extra_body={"num_inference_steps": 150, "seed": 1})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # per-step progress reaches the job
        v = client.videos.retrieve(job.id)
        if v.status == "in_progress" and v.progress > 0:
            break
        time.sleep(0.1)
    assert v.status == "in_progress" and 0 < v.progress < 100, v
    aborted_before = server.metrics()["omni_engine_requests_aborted"]
    deleted = client.videos.delete(job.id)
    assert deleted.deleted and deleted.id == job.id
    # DELETE answers once the engine dropped the work (the end of the step it was in): the
    # answer says so, and /metrics already shows it stopped -- no waiting for it here.
    assert deleted.model_extra["status"] == "cancelled", deleted
    metrics = server.metrics()
    assert metrics["omni_engine_requests_in_flight"] == 0 and metrics["omni_engine_requests_running"] == 0
    assert metrics["omni_engine_requests_aborted"] == aborted_before + 1
    r = requests.get(f"{server.url}/v1/videos/{job.id}", headers=h)
    assert r.status_code == 404
    assert not list(server.extra["video_dir"].glob(f"{job.id}*")) and stored_mp4(server, job.id) is None

    cases = [
        ({"prompt": "x", "size": "huge"}, "WIDTHxHEIGHT"),
        ({"prompt": "x", "num_frames": "1000"}, "--omni-max-frames"),
        ({"prompt": "x", "seconds": "100"}, "--omni-max-frames"),
        ({"prompt": "x", "seconds": "1", "num_frames": "5"}, "not both"),
        ({"size": "64x64"}, "`prompt` is required"),
    ]
    for data, fragment in cases:
        r = requests.post(server.url + "/v1/videos", headers=h, data=data)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    r = requests.post(server.url + "/v1/images/generations", headers=h, json={"prompt": "x"})
    assert r.status_code == 400 and "/v1/videos" in r.json()["error"]["message"]
    # streaming partial images is the image families' (test_image_streaming.py): Wan refuses it by name
    r = requests.post(server.url + "/v1/images/generations", headers=h, json={"prompt": "x", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    assert r.json()["error"]["message"].startswith("wan-t2v cannot stream"), r.text
    # ... and lists the families that do, as their pipelines declare it (the multi-stage DiTs too)
    streaming = streaming_families()
    assert {"qwen-image", "qwen-image-layered", "flux", "bagel", "glm-image"} <= set(streaming) and "wan-t2v" not in streaming
    assert f"streaming: {', '.join(streaming)})" in r.json()["error"]["message"], r.text
    for body, param in [({"stream": True}, "stream"), ({"partial_images": 1}, "partial_images")]:
        r = requests.post(server.url + "/v1/videos", headers=h, json={"prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_restarted_server_keeps_every_finished_job(omni_server, tmp_path):
    """`--omni-job-store sqlite:///PATH`: a server that crashed (SIGKILL) and was started again
    lists and serves every finished job, byte for byte, and says the running one failed, why."""
    extra = ["--omni-job-store", f"sqlite:///{tmp_path}/jobs.db", "--omni-video-retention", "3600"]
    server = omni_server("wan2.2-t2v", variant="store-before", extra=extra)
    client = server.client()
    done = [client.videos.create(prompt=f"boat {i}", extra_body={"seed": i}).id for i in range(2)]
    for video_id in done:
        assert _wait(client, video_id)[0].status == "completed"
    served = {video_id: client.videos.download_content(video_id).read() for video_id in done}
    running = client.videos.create(prompt="a slow one", extra_body={"num_inference_steps": 150, "seed": 3}).id
    deadline = time.monotonic() + 60
    while client.videos.retrieve(running).progress == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.proc.kill()  # a crash mid-job: nothing of the server gets to settle anything
    server.proc.wait(30)

    server = omni_server("wan2.2-t2v", variant="store-after", extra=extra)
    client = server.client()
    listed = {v.id: v for v in client.videos.list().data}
    assert list(listed) == [*done, running]  # every job, in creation order
    for video_id in done:
        assert listed[video_id].status == "completed"
        assert client.videos.download_content(video_id).read() == served[video_id]
    failed = listed[running]
    assert failed.status == "failed" and failed.error.code == "server_stopped", failed
    r = requests.get(f"{server.url}/v1/videos/{running}/content", headers=server.headers())
    assert r.status_code == 409 and "status failed" in r.json()["error"]["message"]
    for video_id in listed:
        assert client.videos.delete(video_id).deleted
    assert client.videos.list().data == []
