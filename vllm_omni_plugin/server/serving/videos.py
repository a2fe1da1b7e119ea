"""Video jobs: validated and queued on POST, finished in the background (the mp4 stored, the job
settled in the job store), cancelled on DELETE once the engine has dropped the work. Jobs live in
the job store (`server/job_store.py`), so any replica sharing it answers for every job."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, RequestAborted
from ..errors import OmniHTTPError
from ..job_store import RUNNING, UNFINISHED
from ..videos import VideoJob
from .common import runtime

# How long DELETE of a running video waits for the engine to drop its work; a step
# that takes longer still stops at its end, and the answer then says "cancelling".
CANCEL_WAIT_S = 120.0
CANCEL_POLL_S = 0.1  # a job cancelled through another server: how often its status is read
logger = logging.getLogger("vllm.omni_plugin.server")


async def create_job(request: Request, fields: dict[str, Any], images: Sequence[Any]) -> JSONResponse:
    """Validate and queue a video; the answer (the job's id to poll) is rendered before the work is queued.

    Args:
        request: the HTTP request.
        fields: the body's generation fields (`input_reference` taken out).
        images: the input reference image (bytes), if any.

    Returns:
        the answer: the new job's JSON, already rendered (a job whose answer could not be
        rendered would run for nobody).

    Raises:
        OmniHTTPError: 503 when the job store cannot take the job (the work is dropped).
    """
    omni = runtime(request)
    canon = await asyncio.to_thread(omni.builder.build, fields, images, task="video")
    p = canon.params
    seconds = (p.num_frames - 1) / p.fps if p.num_frames and p.fps else 0
    job = VideoJob(
        id=omni.videos.new_id(),
        model=fields.get("model") or omni.model_name,
        prompt=p.prompt,
        size=f"{p.width}x{p.height}",
        seconds=f"{seconds:g}",
        resolved=p.public_dict(),
        ignored=canon.ignored,
    )
    # A job either returns its id to its client or never exists: the answer is
    # rendered before the work is queued, and the job is stored with it.
    answer = JSONResponse(job.to_json())
    store = omni.videos
    handle = omni.bridge.submit(p, _progress_writer(omni, job.id, lambda: handle.request_id), prefix="video")
    job.request_id = handle.request_id
    try:
        await store.call(store.add, job)  # queued on the store's thread before any progress write
    except OmniHTTPError:  # the job store is down: the work is dropped, the client gets the 503
        omni.bridge.abort(handle.request_id)
        raise
    store.tasks[job.id] = asyncio.create_task(_finish(request.app.state, job.id, handle))
    return answer


def _progress_writer(omni: Any, job_id: str, request_id_of: Callable[[], str]) -> Callable[[int, int], None]:
    """The engine's per-step callback of a job: writes its progress into the job store (99 at
    most until the mp4 is stored). Where the write no longer matches -- the job was cancelled
    or deleted through this or another server -- the engine work is dropped."""
    store, last = omni.videos, [None]

    def dropped(write: asyncio.Future) -> None:
        if not write.cancelled() and write.exception() is None and not write.result():
            omni.bridge.abort(request_id_of())

    def on_progress(step: int, total: int) -> None:
        value = min(99, int(100 * step / max(total, 1)))
        if value != last[0]:
            last[0] = value
            asyncio.ensure_future(store.call(store.progress, job_id, value)).add_done_callback(dropped)

    return on_progress


async def _finish(request_app_state: Any, job_id: str, handle: Any) -> None:
    """Background: wait for the engine, store the mp4, settle the job."""
    omni = request_app_state.omni
    store = omni.videos
    part = store.scratch / f"{job_id}.part.mp4"
    try:
        output = await omni.bridge.result(handle)
        if await store.call(store.status, job_id) in RUNNING:  # not cancelled or deleted meanwhile
            await asyncio.to_thread(output.save_mp4, part)
            data = await asyncio.to_thread(part.read_bytes)
            await store.call(store.complete, job_id, data)
        if await store.call(store.status, job_id) == "cancelling":  # finished in the step the DELETE came in
            await store.call(store.cancelled, job_id)
    except (RequestAborted, EngineStopped) as exc:
        if await store.call(store.status, job_id) == "cancelling":
            await store.call(store.cancelled, job_id)
        else:
            await store.call(store.fail, job_id, "aborted", str(exc))
    except (GenerationFailed, OSError, ValueError) as exc:  # engine errors, mp4 export errors
        # the request was validated before it was queued: a failure now is the server's
        logger.error("omni: video %s (request %s) failed", job_id, handle.request_id, exc_info=exc)
        await store.call(store.fail, job_id, "generation_failed", f"{exc}; request id {handle.request_id}")
    finally:
        part.unlink(missing_ok=True)
        store.tasks.pop(job_id, None)


async def delete_job(request: Request, job: VideoJob) -> dict[str, Any]:
    """Delete `job`: an unfinished one is cancelled first, and the answer waits until its engine work stopped.

    Args:
        request: the HTTP request.
        job: the job to delete (as read from the job store).

    Returns:
        the `video.deleted` JSON.
    """
    omni = runtime(request)
    store = omni.videos
    status = job.status
    if status in UNFINISHED:
        status = await store.call(store.request_cancel, job.id)
        # Answer once the engine has dropped the work (the end of the denoise step it is in),
        # so the answer and /metrics say it stopped, not only that the record is gone. The job
        # runs here: abort it now; elsewhere: its server sees `cancelling` at its next step.
        task = store.tasks.get(job.id)
        if task is not None:
            omni.bridge.abort(job.request_id)
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
            status = await store.call(store.status, job.id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while status == "cancelling" and time.monotonic() < deadline:
            await asyncio.sleep(CANCEL_POLL_S)
            status = await store.call(store.status, job.id)
        status = status or "cancelled"  # deleted meanwhile (a concurrent DELETE)
    await store.call(store.delete, job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True, "status": status}
