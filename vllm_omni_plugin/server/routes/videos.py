"""/v1/videos: create (multipart or JSON), retrieve, list, download, delete.

A video is a job: POST validates and queues it (bad input fails right there,
with a 4xx), the engine runs it in the background, GET reports status and
progress, GET .../content sends the mp4 once it is completed. Deleting a
job that is still running aborts its engine work and answers once the engine
has dropped it (at the end of the denoise step it was in), with `status:
"cancelled"`. Jobs live in the job store (`job_store.py`), so any replica
sharing it answers for every job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...request import RequestError
from ...orchestrator.engine_loop import EngineStopped, GenerationFailed, RequestAborted
from ..errors import OmniHTTPError
from ..job_store import RUNNING, UNFINISHED
from ..videos import VideoJob, VideoNotFound
from .common import check_request, json_body, json_response, omni_route, read_form, runtime

router = APIRouter()
# How long DELETE of a running video waits for the engine to drop its work; a step
# that takes longer still stops at its end, and the answer then says "cancelling".
CANCEL_WAIT_S = 120.0
CANCEL_POLL_S = 0.1  # a job cancelled through another server: how often its status is read
logger = logging.getLogger("vllm.omni_plugin.server")


async def _job(request: Request, video_id: str) -> VideoJob:
    store = runtime(request).videos
    try:
        return await store.call(store.get, video_id)
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


@router.post("/v1/videos")
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
    # rendered before the work is queued, and the job is stored with it.
    response = json_response(job.to_json())
    store = omni.videos
    handle = omni.bridge.submit(p, _progress_writer(omni, job.id, lambda: handle.request_id), prefix="video")
    job.request_id = handle.request_id
    try:
        await store.call(store.add, job)  # queued on the store's thread before any progress write
    except OmniHTTPError:  # the job store is down: the work is dropped, the client gets the 503
        omni.bridge.abort(handle.request_id)
        raise
    store.tasks[job.id] = asyncio.create_task(_finish(request.app.state, job.id, handle))
    return response


@router.get("/v1/videos")
@omni_route("videos.list")
async def list_videos(request: Request):
    store = runtime(request).videos
    data = [j.to_json() for j in await store.call(store.list)]
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
    return json_response((await _job(request, video_id)).to_json())


@router.get("/v1/videos/{video_id}/content")
@omni_route("videos.content")
async def video_content(request: Request, video_id: str, variant: str = "video"):
    store = runtime(request).videos
    job = await _job(request, video_id)
    if variant != "video":
        raise RequestError(f"variant {variant!r} is not available; this server stores the video only", "variant")
    if job.status != "completed":
        raise OmniHTTPError(409, f"video {video_id} is not ready (status {job.status}); poll GET /v1/videos/{video_id}")
    data = await store.call(store.content, job.id)
    if data is None:
        raise OmniHTTPError(404, f"the file of video {video_id} is gone (expired or deleted)", "video_id")
    return Response(data, media_type="video/mp4", headers={"Content-Disposition": f'attachment; filename="{job.id}.mp4"'})


@router.delete("/v1/videos/{video_id}")
@omni_route("videos.delete")
async def delete_video(request: Request, video_id: str):
    omni = runtime(request)
    store = omni.videos
    job = await _job(request, video_id)
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
    return json_response({"id": job.id, "object": "video.deleted", "deleted": True, "status": status})
