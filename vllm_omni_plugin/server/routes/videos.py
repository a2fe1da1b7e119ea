"""/v1/videos: create (multipart or JSON), retrieve, list, download, delete.

A video is a job: POST validates and queues it (bad input fails right there,
with a 4xx), the engine runs it in the background, GET reports status and
progress, GET .../content streams the mp4 once it is completed. Deleting a
job that is still running aborts its engine work and answers once the engine
has dropped it (at the end of the denoise step it was in), with `status:
"cancelled"`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ...request import RequestError
from ...request.protocol import request_body
from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, RequestAborted
from ..errors import OmniHTTPError
from ..videos import VideoJob, VideoNotFound
from .common import check_request, json_body, json_response, omni_route, read_form, runtime

router = APIRouter()
# How long DELETE of a running video waits for the engine to drop its work; a step
# that takes longer still stops at its end, and the answer then says "cancelling".
CANCEL_WAIT_S = 120.0
logger = logging.getLogger("vllm.omni_plugin.server")


def _job(request: Request, video_id: str) -> VideoJob:
    try:
        return runtime(request).videos.get(video_id)
    except VideoNotFound:
        raise OmniHTTPError(404, f"No video found with id {video_id!r}", "video_id") from None


async def _video_inputs(request: Request) -> tuple[dict[str, Any], list[Any]]:
    omni = runtime(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await json_body(request)
        ref = body.pop("input_reference", None)
        if ref is None:
            return body, []
        if not isinstance(ref, dict) or "image_url" not in ref:
            raise RequestError('`input_reference` must be {"image_url": URL} in a JSON body', "input_reference")
        return body, [await omni.media.fetch_image(ref["image_url"], "input_reference")]
    return await read_form(request, ("input_reference",), ("input_reference[image_url]",))


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


@router.post("/v1/videos", openapi_extra={"requestBody": request_body("/v1/videos")})
@omni_route("videos.create")
async def create_video(request: Request):
    omni = runtime(request)
    fields, images = await _video_inputs(request)
    check_request(request, fields)
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
    response = json_response(job.to_json())
    handle = omni.bridge.submit(p, job.on_progress, prefix="video")
    job.request_id = handle.request_id
    omni.videos.add(job)
    job.task = asyncio.create_task(_finish(request.app.state, job, handle))
    return response


@router.get("/v1/videos")
@omni_route("videos.list")
async def list_videos(request: Request):
    jobs = sorted(runtime(request).videos.jobs.values(), key=lambda j: j.created_at)
    data = [j.to_json() for j in jobs]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }
    )


@router.get("/v1/videos/{video_id}")
@omni_route("videos.retrieve")
async def retrieve_video(request: Request, video_id: str):
    return json_response(_job(request, video_id).to_json())


@router.get("/v1/videos/{video_id}/content")
@omni_route("videos.content")
async def video_content(request: Request, video_id: str, variant: str = "video"):
    job = _job(request, video_id)
    if variant != "video":
        raise RequestError(f"variant {variant!r} is not available; this server stores the video only", "variant")
    if job.status != "completed":
        raise OmniHTTPError(409, f"video {video_id} is not ready (status {job.status}); poll GET /v1/videos/{video_id}")
    path = runtime(request).videos.path_for(job.id)
    if not path.is_file():
        raise OmniHTTPError(404, f"the file of video {video_id} is gone (expired or deleted)", "video_id")
    return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")


@router.delete("/v1/videos/{video_id}")
@omni_route("videos.delete")
async def delete_video(request: Request, video_id: str):
    omni = runtime(request)
    job = _job(request, video_id)
    if job.status in ("queued", "in_progress", "cancelling") and job.task is not None:
        if job.status != "cancelling":
            omni.videos.cancelling(job)
            omni.bridge.abort(job.request_id)
        # Answer once the engine has dropped the work (the end of the denoise step it is
        # in), so the answer and /metrics say it stopped, not only that the record is gone.
        await asyncio.wait({job.task}, timeout=CANCEL_WAIT_S)
    if job.id in omni.videos.jobs:  # a concurrent DELETE may have removed it meanwhile
        omni.videos.delete(job.id)
    return json_response({"id": job.id, "object": "video.deleted", "deleted": True, "status": job.status})
