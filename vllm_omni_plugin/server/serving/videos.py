"""Video jobs: validated and queued on POST, finished in the background (the mp4 written, the job
settled), cancelled on DELETE once the engine has dropped the work."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, RequestAborted
from ..videos import VideoJob
from .common import runtime

# How long DELETE of a running video waits for the engine to drop its work; a step
# that takes longer still stops at its end, and the answer then says "cancelling".
CANCEL_WAIT_S = 120.0
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
    # rendered before the work is queued, and the job is registered with it.
    answer = JSONResponse(job.to_json())
    handle = omni.bridge.submit(p, job.on_progress, prefix="video")
    job.request_id = handle.request_id
    omni.videos.add(job)
    job.task = asyncio.create_task(_finish(request.app.state, job, handle))
    return answer


async def _finish(request_app_state: Any, job: VideoJob, handle: Any) -> None:
    """Background: wait for the engine, write the mp4, settle the job."""
    omni = request_app_state.omni
    try:
        output = await omni.bridge.result(handle)
        if job.status == "cancelling":  # finished in the step the DELETE arrived in: dropped all the same
            omni.videos.cancelled(job)
            return
        if job.deleted:
            return
        path = omni.videos.path_for(job.id)
        part = omni.videos.partial_path_for(job.id)
        await asyncio.to_thread(output.save_mp4, part)
        if job.deleted:
            part.unlink(missing_ok=True)
            return
        part.replace(path)
        omni.videos.complete(job)
    except (RequestAborted, EngineStopped) as exc:
        if job.status == "cancelling":
            omni.videos.cancelled(job)
        elif not job.deleted:
            omni.videos.fail(job, "aborted", str(exc))
    except (GenerationFailed, OSError, ValueError) as exc:  # engine errors, mp4 export errors
        # the request was validated before it was queued: a failure now is the server's
        logger.error("omni: video %s (request %s) failed", job.id, job.request_id, exc_info=exc)
        if not job.deleted:
            omni.videos.fail(job, "generation_failed", f"{exc}; request id {job.request_id}")


async def delete_job(request: Request, job: VideoJob) -> dict[str, Any]:
    """Delete `job`: an unfinished one is cancelled first, and the answer waits until its engine work stopped.

    Args:
        request: the HTTP request.
        job: the job to delete.

    Returns:
        the `video.deleted` JSON.
    """
    omni = runtime(request)
    if job.status in ("queued", "in_progress", "cancelling") and job.task is not None:
        if job.status != "cancelling":
            omni.videos.cancelling(job)
            omni.bridge.abort(job.request_id)
        # Answer once the engine has dropped the work (the end of the denoise step it is
        # in), so the answer and /metrics say it stopped, not only that the record is gone.
        await asyncio.wait({job.task}, timeout=CANCEL_WAIT_S)
    if job.id in omni.videos.jobs:  # a concurrent DELETE may have removed it meanwhile
        omni.videos.delete(job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True, "status": job.status}
