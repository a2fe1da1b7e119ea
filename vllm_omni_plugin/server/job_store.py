"""The video job store: every job's record and its finished mp4, in one database.

    --omni-job-store sqlite:///PATH            one server (the default: a temporary file)
    --omni-job-store postgresql://HOST/DB      several replicas sharing one job list

A job's row and its file are one row: the mp4 is a column (BLOB / BYTEA), so a job is
`completed` exactly when its bytes are stored, a restart or a crash leaves no row pointing
at a missing file and no orphan file, and replicas on different hosts need nothing shared
but the database URL (no network file system). The price is that a download reads the
whole video into memory; videos here are megabytes.

Ownership: each server is one `owner` that heartbeats into `omni_replicas`. A job runs on
the server that accepted it; any server can read, list, download or delete it. A DELETE of
a job that runs elsewhere marks it `cancelling`; its owner sees that at its next denoise
step (its progress write no longer matches) and drops the work. Jobs of an owner that
stopped heartbeating are failed by whichever server notices first, with a reason, so no
job stays `in_progress` forever. A SQLite store belongs to one server (a lock file says
so), so at start-up every unfinished job in it is one the previous run left behind.

Every statement is one atomic statement (conditional UPDATE/DELETE), so concurrent writers
from several replicas need no transactions or locks of ours. sqlite3 (stdlib) and psycopg
speak the same SQL here; the one difference, the parameter marker, is handled in `_Db`
(a query builder such as SQLAlchemy would be a large dependency for ten statements).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .videos import VIDEO_ID, VideoJob, VideoNotFound

#: a server heartbeats this often; its jobs are failed once it has been silent for DEAD_AFTER_S
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 10.0
_SCHEMA_LOCK = 0x6F6D6E69  # "omni": the advisory lock id the schema is created under
RUNNING = ("queued", "in_progress")
UNFINISHED = ("queued", "in_progress", "cancelling")
_COLUMNS = ("id", "owner", "model", "prompt", "size", "seconds", "created_at", "created_ns", "status", "progress",
            "completed_at", "expires_at", "error", "request_id", "resolved", "ignored")
_SELECT = ", ".join(_COLUMNS)


class JobStoreError(ValueError):
    """A bad --omni-job-store URL, or a store another server holds; the message says which."""


class _Db:
    """One DB-API connection in autocommit mode, used from one thread at a time."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.lock_file: Any = None
        if parts.scheme == "sqlite":
            # sqlite:///relative/path or sqlite:////absolute/path (SQLAlchemy's spelling)
            path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
            if path is None or not str(path):
                raise JobStoreError(f"--omni-job-store {url!r}: write sqlite:///PATH (a file path)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._hold_lock(path)
            self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.kind, self.blob, self.marker, self.errors = "sqlite", "BLOB", "?", (sqlite3.Error,)
        elif parts.scheme in ("postgresql", "postgres"):
            try:
                import psycopg
            except ImportError as e:
                raise JobStoreError(f"--omni-job-store {url!r} needs psycopg: pip install 'psycopg[binary]'") from e
            self._connect = lambda: psycopg.connect(url, autocommit=True, connect_timeout=10)
            try:
                self.conn = self._connect()
            except psycopg.OperationalError as e:
                raise JobStoreError(f"--omni-job-store: cannot reach {_redacted(url)}: {e}") from e
            self.kind, self.blob, self.marker, self.errors = "postgresql", "BYTEA", "%s", (psycopg.Error,)
        else:
            raise JobStoreError(f"--omni-job-store {url!r}: the scheme must be sqlite:/// or postgresql://")

    def _hold_lock(self, path: Path) -> None:
        self.lock_file = open(f"{path}.lock", "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            raise JobStoreError(
                f"--omni-job-store sqlite:///{path}: another server uses this file; a SQLite store is one "
                "server's (replicas share a postgresql:// store)"
            ) from None

    def execute(self, sql: str, params: tuple = ()) -> Any:
        if self.marker == "?":
            return self.conn.execute(sql, params)
        sql = sql.replace("?", self.marker)
        if self.conn.broken:  # the database restarted or the link dropped: one new connection
            self.conn = self._connect()
        return self.conn.execute(sql, params)

    def close(self) -> None:
        self.conn.close()
        if self.lock_file is not None:
            self.lock_file.close()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.password, "***") if parts.password else url


class JobStore:
    """Video jobs and their files in SQLite or Postgres (see the module docstring).

    Blocking methods are for a worker thread; `call` runs one there (the store's own
    single thread, so statements reach the connection in the order they were made).
    """

    def __init__(self, url: str | None, retention_s: float, scratch: Path | None = None) -> None:
        """Open (and create) the store.

        Args:
            url: `sqlite:///PATH` or `postgresql://...`; None: a temporary SQLite file,
                removed by `close` (jobs then live as long as the server, as before).
            retention_s: seconds a finished job (and its file) is kept.
            scratch: where an mp4 is encoded before it is stored (default: a temporary dir).
        """
        self._tmp = tempfile.mkdtemp(prefix="omni-videos-")
        self.scratch = (scratch or Path(self._tmp)).resolve()
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.tasks: dict[str, asyncio.Task] = {}  # jobs this server runs -> the task finishing each
        self._db = _Db(url or f"sqlite:///{self._tmp}/jobs.db")
        self.kind = self._db.kind
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-job-store")
        self._closed = threading.Event()
        self._create()
        self.heartbeat()
        # A SQLite store is this server's alone: whatever is unfinished in it, a previous run left.
        self.reap(dead_after_s=0.0 if self.kind == "sqlite" else DEAD_AFTER_S)

    # ---- plumbing ---------------------------------------------------------------
    async def call(self, fn: Callable, *args) -> Any:
        """Run `fn(*args)` (a method of this store) on the store's thread; a database error is
        a 503 naming the store (the job and the server are fine, the store is not)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except self._db.errors as e:
            from .errors import OmniHTTPError  # here: the route layer's error, kept out of replica processes' imports

            raise OmniHTTPError(503, f"the video job store ({self.kind}) failed: {e}; retry later") from e

    def _create(self) -> None:
        # Replicas starting together on a fresh database: Postgres' CREATE TABLE IF NOT EXISTS
        # is not safe against itself (a concurrent one fails on pg_type's unique index), so
        # the creators take turns under an advisory lock.
        if self.kind == "postgresql":
            self._db.execute("SELECT pg_advisory_lock(?)", (_SCHEMA_LOCK,))
        try:
            self._create_tables()
        finally:
            if self.kind == "postgresql":
                self._db.execute("SELECT pg_advisory_unlock(?)", (_SCHEMA_LOCK,))

    def _create_tables(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS omni_video_jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
            "model TEXT NOT NULL, prompt TEXT NOT NULL, size TEXT NOT NULL, seconds TEXT NOT NULL, "
            "created_at BIGINT NOT NULL, created_ns BIGINT NOT NULL, status TEXT NOT NULL, progress INTEGER NOT NULL, "
            "completed_at BIGINT, expires_at BIGINT, error TEXT, request_id TEXT, resolved TEXT, "
            f"ignored TEXT NOT NULL, content {self._db.blob})"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS omni_replicas (owner TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL)")

    @staticmethod
    def _job(row: tuple) -> VideoJob:
        d = dict(zip(_COLUMNS, row))
        return VideoJob(
            id=d["id"], model=d["model"], prompt=d["prompt"], size=d["size"], seconds=d["seconds"],
            created_at=d["created_at"], status=d["status"], progress=d["progress"], completed_at=d["completed_at"],
            expires_at=d["expires_at"], error=json.loads(d["error"]) if d["error"] else None,
            request_id=d["request_id"], resolved=json.loads(d["resolved"]) if d["resolved"] else None,
            ignored=tuple(json.loads(d["ignored"])), owner=d["owner"],
        )

    # ---- records ----------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return f"video_{secrets.token_hex(16)}"

    def add(self, job: VideoJob) -> None:
        """Record a new job as this server's."""
        if not VIDEO_ID.match(job.id):
            raise ValueError(f"bad video id {job.id!r}")
        job.owner = self.owner
        self._db.execute(
            f"INSERT INTO omni_video_jobs ({_SELECT}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (job.id, job.owner, job.model, job.prompt, job.size, job.seconds, job.created_at, time.time_ns(),
             job.status, job.progress, job.completed_at, job.expires_at, json.dumps(job.error) if job.error else None,
             job.request_id, json.dumps(job.resolved) if job.resolved is not None else None, json.dumps(list(job.ignored))),
        )

    def get(self, video_id: str) -> VideoJob:
        """The job with this id; VideoNotFound for anything else (a client string is only compared)."""
        if not isinstance(video_id, str) or not VIDEO_ID.match(video_id):
            raise VideoNotFound(video_id)
        row = self._db.execute(f"SELECT {_SELECT} FROM omni_video_jobs WHERE id = ?", (video_id,)).fetchone()
        if row is None:
            raise VideoNotFound(video_id)
        return self._job(row)

    def list(self) -> list[VideoJob]:
        """Every job, oldest first."""
        rows = self._db.execute(f"SELECT {_SELECT} FROM omni_video_jobs ORDER BY created_ns, id").fetchall()
        return [self._job(r) for r in rows]

    def progress(self, video_id: str, progress: int) -> bool:
        """A denoise step of a job this server runs. False: the job is no longer running here
        (cancelled or deleted through any server), so its work is to be dropped."""
        cur = self._db.execute(
            "UPDATE omni_video_jobs SET status = 'in_progress', progress = ? "
            "WHERE id = ? AND status IN ('queued', 'in_progress')", (progress, video_id))
        return cur.rowcount == 1

    def complete(self, video_id: str, content: bytes) -> str | None:
        """Store the finished mp4. Returns "completed", or the status that kept it from
        completing ("cancelling": cancelled meanwhile), or None when the job was deleted."""
        now = int(time.time())
        cur = self._db.execute(
            "UPDATE omni_video_jobs SET status = 'completed', progress = 100, completed_at = ?, expires_at = ?, "
            "content = ? WHERE id = ? AND status IN ('queued', 'in_progress')",
            (now, now + int(self.retention_s), content, video_id))
        return "completed" if cur.rowcount == 1 else self.status(video_id)

    def status(self, video_id: str) -> str | None:
        row = self._db.execute("SELECT status FROM omni_video_jobs WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else row[0]

    def content(self, video_id: str) -> bytes | None:
        """The mp4 of a completed job (None when it has none)."""
        row = self._db.execute("SELECT content FROM omni_video_jobs WHERE id = ? AND status = 'completed'",
                               (video_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def request_cancel(self, video_id: str) -> str | None:
        """DELETE of an unfinished job: mark it `cancelling` (its owner drops the work at its
        next step). Returns the job's status after the call (None: no such job)."""
        self._db.execute("UPDATE omni_video_jobs SET status = 'cancelling' WHERE id = ? AND status IN ('queued', 'in_progress')",
                         (video_id,))
        return self.status(video_id)

    def cancelled(self, video_id: str) -> None:
        """The engine dropped the job's work."""
        self._db.execute("UPDATE omni_video_jobs SET status = 'cancelled', completed_at = ? WHERE id = ? AND status = 'cancelling'",
                         (int(time.time()), video_id))

    def fail(self, video_id: str, code: str, message: str) -> None:
        """Settle an unfinished job as failed, with an OpenAI-style error object."""
        now = int(time.time())
        # An error text may quote anything an exception carried: keep it encodable, so one
        # failed job can never break GET /v1/videos for every client.
        error = {"code": code, "message": message.encode("utf-8", "backslashreplace").decode("utf-8")}
        self._db.execute(
            "UPDATE omni_video_jobs SET status = 'failed', completed_at = ?, expires_at = ?, error = ? "
            "WHERE id = ? AND status IN ('queued', 'in_progress')",
            (now, now + int(self.retention_s), json.dumps(error), video_id))

    def delete(self, video_id: str) -> bool:
        """Remove the job and its file; False when it was already gone."""
        return self._db.execute("DELETE FROM omni_video_jobs WHERE id = ?", (video_id,)).rowcount == 1

    def expire(self, now: float | None = None) -> list[str]:
        """Delete finished jobs (and their files) whose retention has passed."""
        now = int(time.time() if now is None else now)
        rows = self._db.execute("DELETE FROM omni_video_jobs WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING id",
                                (now,)).fetchall()
        return [r[0] for r in rows]

    # ---- replicas ---------------------------------------------------------------
    def heartbeat(self) -> None:
        self._db.execute(
            "INSERT INTO omni_replicas (owner, seen_at) VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at",
            (self.owner, time.time()))

    def reap(self, dead_after_s: float = DEAD_AFTER_S) -> list[str]:
        """Settle the unfinished jobs of servers silent for `dead_after_s`: running ones fail
        (with the reason), cancelling ones are cancelled (their work is gone). Returns their ids."""
        now = time.time()
        alive = "SELECT owner FROM omni_replicas WHERE seen_at > ? AND owner <> ?"
        others = f"owner <> ? AND owner NOT IN ({alive})"
        message = ("the server running this job stopped before it finished (it was restarted or died); "
                   "submit the job again")
        error = json.dumps({"code": "server_stopped", "message": message})
        failed = self._db.execute(
            f"UPDATE omni_video_jobs SET status = 'failed', completed_at = ?, expires_at = ?, error = ? "
            f"WHERE status IN ('queued', 'in_progress') AND {others} RETURNING id",
            (int(now), int(now + self.retention_s), error, self.owner, now - dead_after_s, self.owner)).fetchall()
        cancelled = self._db.execute(
            f"UPDATE omni_video_jobs SET status = 'cancelled', completed_at = ? WHERE status = 'cancelling' AND {others} "
            "RETURNING id", (int(now), self.owner, now - dead_after_s, self.owner)).fetchall()
        self._db.execute("DELETE FROM omni_replicas WHERE seen_at <= ? AND owner <> ?",
                         (now - max(dead_after_s, DEAD_AFTER_S) * 6, self.owner))
        return [r[0] for r in failed + cancelled]

    def close(self) -> None:
        """Say this server is gone (its jobs are then reaped at once by the others) and close."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.shutdown(wait=True)
        try:
            self._db.execute("DELETE FROM omni_replicas WHERE owner = ?", (self.owner,))
        finally:
            self._db.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
