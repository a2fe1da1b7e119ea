"""The video job store on its own (no engine): SQLite across a crash and a restart, a real
PostgreSQL server written by two replica processes at once, jobs of a dead replica failed
by the living one, a job cancelled through the replica that does not run it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from vllm_omni_plugin.server.job_store import JobStore, JobStoreError
from vllm_omni_plugin.server.videos import VideoJob

from .postgres import postgres  # noqa: F401 -- fixture

# One replica: opens the store, writes the jobs it is given, and ends as told: "crash" leaves
# without closing (a SIGKILL has the same effect), "hang" keeps the store open until killed.
REPLICA = textwrap.dedent("""
    import json, os, sys, time
    from vllm_omni_plugin.server.job_store import JobStore
    from vllm_omni_plugin.server.videos import VideoJob
    url, plan, end = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    store = JobStore(url, retention_s=3600)
    for step in plan:
        op, vid = step[0], step[1]
        if op == "add":
            store.add(VideoJob(id=vid, model="m", prompt="p " + vid, size="64x64", seconds="1"))
        elif op == "progress":
            assert store.progress(vid, step[2]), vid
        elif op == "complete":
            assert store.complete(vid, vid.encode() * step[2]) == "completed", vid
        elif op == "fail":
            store.fail(vid, "generation_failed", "boom " + vid)
        elif op == "list":
            store.list()
    print("ready", flush=True)
    if end == "crash":
        os._exit(0)
    if end == "hang":
        while True:
            store.heartbeat(); time.sleep(0.2)
    store.close()
""")


def replica(url: str, plan: list, end: str = "close") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REPLICA, url, json.dumps(plan), end], stdout=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ready" in out, out


def ids(prefix: int, n: int) -> list[str]:
    return [f"video_{prefix:02x}{i:030x}" for i in range(n)]


def test_sqlite_store_survives_a_crash_and_belongs_to_one_server(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    done, running, queued = ids(1, 3)
    server = replica(url, [["add", done], ["progress", done, 40], ["complete", done, 1000],
                           ["add", running], ["progress", running, 50], ["add", queued]], end="hang")
    assert server.stdout.readline().strip() == "ready"
    with pytest.raises(JobStoreError, match="another server uses this file"):
        JobStore(url, retention_s=3600)
    server.kill()  # the server dies with a job running and one queued
    server.wait()

    store = JobStore(url, retention_s=3600)  # the restarted server
    try:
        jobs = {j.id: j for j in store.list()}
        assert list(jobs) == [done, running, queued]  # every job, in creation order
        assert jobs[done].status == "completed" and jobs[done].progress == 100
        assert store.content(done) == done.encode() * 1000
        for vid in (running, queued):
            assert jobs[vid].status == "failed" and jobs[vid].error["code"] == "server_stopped", jobs[vid]
            assert "stopped before it finished" in jobs[vid].error["message"]
            assert store.content(vid) is None
        assert store.delete(done) and store.content(done) is None and not store.delete(done)
    finally:
        store.close()


def test_postgres_two_replicas_write_at_once(postgres):
    a, b = ids(0xA, 40), ids(0xB, 40)

    def plan(mine: list[str]) -> list:
        steps = []
        for i, vid in enumerate(mine):
            steps += [["add", vid], ["progress", vid, 30], ["list", None], ["progress", vid, 60]]
            steps.append(["complete", vid, i + 1] if i % 2 == 0 else ["fail", vid])
        return steps

    first, second = replica(postgres.url, plan(a)), replica(postgres.url, plan(b))
    finished(first)
    finished(second)
    store = JobStore(postgres.url, retention_s=3600)
    try:
        jobs = {j.id: j for j in store.list()}
        assert set(jobs) == set(a) | set(b)
        for mine in (a, b):
            for i, vid in enumerate(mine):
                if i % 2 == 0:
                    assert jobs[vid].status == "completed" and jobs[vid].progress == 100
                    assert store.content(vid) == vid.encode() * (i + 1)
                else:
                    assert jobs[vid].status == "failed" and jobs[vid].progress == 60
                    assert jobs[vid].error == {"code": "generation_failed", "message": f"boom {vid}"}
        # each list is in creation order: the order of each replica's own jobs is kept
        order = [j.id for j in store.list()]
        assert [v for v in order if v in a] == a and [v for v in order if v in b] == b
    finally:
        for vid in a + b:
            store.delete(vid)
        store.close()


def test_postgres_cancel_through_the_other_replica(postgres):
    owner = JobStore(postgres.url, retention_s=3600)
    other = JobStore(postgres.url, retention_s=3600)
    vid, = ids(0xC, 1)
    try:
        owner.add(VideoJob(id=vid, model="m", prompt="p", size="64x64", seconds="1"))
        assert owner.progress(vid, 10)
        assert other.request_cancel(vid) == "cancelling"  # a DELETE that reached the other replica
        assert not owner.progress(vid, 20)  # the owner's next step sees it and drops the work
        assert owner.complete(vid, b"late") == "cancelling"  # nor can it complete it now
        owner.cancelled(vid)
        assert other.get(vid).status == "cancelled" and other.content(vid) is None
        assert other.delete(vid) and not owner.delete(vid)
    finally:
        owner.close()
        other.close()


def test_postgres_jobs_of_a_dead_replica_fail_and_a_live_ones_do_not(postgres):
    dead_job, live_job = ids(0xD, 2)
    dead = replica(postgres.url, [["add", dead_job], ["progress", dead_job, 50]], end="hang")
    live = replica(postgres.url, [["add", live_job], ["progress", live_job, 50]], end="hang")
    survivor = JobStore(postgres.url, retention_s=3600)
    try:
        assert dead.stdout.readline().strip() == "ready" and live.stdout.readline().strip() == "ready"
        assert survivor.reap(dead_after_s=1.0) == []  # both heartbeat
        dead.kill()
        dead.wait()
        time.sleep(1.5)
        assert survivor.reap(dead_after_s=1.0) == [dead_job]
        job = survivor.get(dead_job)
        assert job.status == "failed" and job.error["code"] == "server_stopped" and job.progress == 50
        assert survivor.get(live_job).status == "in_progress"
    finally:
        for proc in (dead, live):
            proc.kill()
            proc.wait()
        for vid in (dead_job, live_job):
            survivor.delete(vid)
        survivor.close()


def test_bad_store_urls_are_refused(tmp_path):
    with pytest.raises(JobStoreError, match="sqlite:/// or postgresql://"):
        JobStore("mysql://x/y", retention_s=1)
    with pytest.raises(JobStoreError, match="cannot reach"):
        JobStore("postgresql://nobody@127.0.0.1:1/none", retention_s=1)
