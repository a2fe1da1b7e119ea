"""Video jobs (`/v1/videos`): their state, their files, their retention.

A video id is `video_` + 32 hex digits, made here; it is checked against that
pattern and looked up in the job table before any path is formed, and the
path is `<storage>/<id>.mp4` checked to lie directly in `<storage>`. A client
string never reaches the file system. Finished videos are deleted on DELETE
and `retention_s` seconds after they complete. Deleting an unfinished job
cancels it first: the job says `cancelling` until the engine has dropped its
work (at the end of the denoise step it is in), then `cancelled`.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")


class VideoNotFound(KeyError):
    pass


@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str
    size: str
    seconds: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"  # queued | in_progress | completed | failed | cancelling | cancelled
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, Any] | None = None
    request_id: str | None = None
    resolved: dict[str, Any] | None = None
    ignored: tuple[str, ...] = ()  # fields accepted without effect
    deleted: bool = False
    task: Any = None  # the asyncio task that finishes the job (kept referenced)

    def on_progress(self, step: int, total: int) -> None:
        if self.status == "queued":
            self.status = "in_progress"
        # 99 at most until the mp4 is written.
        self.progress = min(99, int(100 * step / max(total, 1)))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "video",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "status": self.status,
            "progress": self.progress,
            "model": self.model,
            "prompt": self.prompt,
            "seconds": self.seconds,
            "size": self.size,
            "error": self.error,
            "remixed_from_video_id": None,
            "omni": {"resolved": self.resolved, "ignored": list(self.ignored)},
        }


class VideoStore:
    def __init__(self, root: Path | None, retention_s: float) -> None:
        self._tmp = None
        if root is None:
            self._tmp = tempfile.mkdtemp(prefix="omni-videos-")
            root = Path(self._tmp)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.retention_s = retention_s
        self.jobs: dict[str, VideoJob] = {}

    @staticmethod
    def new_id() -> str:
        return f"video_{secrets.token_hex(16)}"

    def add(self, job: VideoJob) -> None:
        if not VIDEO_ID.match(job.id):
            raise ValueError(f"bad video id {job.id!r}")
        self.jobs[job.id] = job

    def get(self, video_id: str) -> VideoJob:
        if not isinstance(video_id, str) or not VIDEO_ID.match(video_id) or video_id not in self.jobs:
            raise VideoNotFound(video_id)
        return self.jobs[video_id]

    def path_for(self, video_id: str) -> Path:
        job = self.get(video_id)  # only ids this store made
        path = (self.root / f"{job.id}.mp4").resolve()
        if path.parent != self.root:
            raise VideoNotFound(video_id)
        return path

    def partial_path_for(self, video_id: str) -> Path:
        """Where the mp4 is written before it is renamed into place (ends in .mp4 for the muxer)."""
        path = self.path_for(video_id)
        return path.with_name(f"{path.stem}.part.mp4")

    def complete(self, job: VideoJob) -> None:
        now = int(time.time())
        job.status, job.progress, job.completed_at = "completed", 100, now
        job.expires_at = now + int(self.retention_s)

    def cancelling(self, job: VideoJob) -> None:
        """DELETE of an unfinished job: its engine work is being aborted."""
        job.status = "cancelling"

    def cancelled(self, job: VideoJob) -> None:
        """The engine dropped the job's work (at the end of the denoise step it was in)."""
        job.status, job.completed_at = "cancelled", int(time.time())

    def fail(self, job: VideoJob, code: str, message: str) -> None:
        now = int(time.time())
        job.status, job.completed_at = "failed", now
        job.expires_at = now + int(self.retention_s)
        # An error text may quote anything an exception carried: keep it encodable, so
        # one failed job can never break GET /v1/videos for every client.
        job.error = {"code": code, "message": message.encode("utf-8", "backslashreplace").decode("utf-8")}

    def delete(self, video_id: str) -> VideoJob:
        path, partial = self.path_for(video_id), self.partial_path_for(video_id)
        job = self.jobs.pop(video_id)
        job.deleted = True
        path.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        return job

    def expire(self, now: float | None = None) -> list[str]:
        """Delete finished jobs (and their files) whose retention has passed."""
        now = time.time() if now is None else now
        gone = [j.id for j in self.jobs.values() if j.expires_at is not None and j.expires_at <= now]
        for video_id in gone:
            self.delete(video_id)
        return gone

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
