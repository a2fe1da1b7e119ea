"""Video jobs (`/v1/videos`): the record of one job and its public JSON.

Where jobs and their files live is `job_store.py` (SQLite, or Postgres for replicas).
A video id is `video_` + 32 hex digits, made by the store; a client string is only
compared with stored ids, never used to form a path. Finished videos are deleted on
DELETE and `retention_s` seconds after they complete. Deleting an unfinished job
cancels it first: the job says `cancelling` until the engine has dropped its work (at
the end of the denoise step it is in), then `cancelled`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
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
    owner: str | None = None  # the server running it (job_store.JobStore.owner)

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
