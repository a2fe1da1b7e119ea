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

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...request import RequestError
from ...request.protocol import request_body
from ..errors import OmniHTTPError
from ..serving.common import runtime
from ..serving.videos import create_job, delete_job
from ..videos import VideoJob, VideoNotFound
from .common import check_request, json_body, json_response, omni_route, read_form

router = APIRouter()


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


@router.post("/v1/videos", openapi_extra={"requestBody": request_body("/v1/videos")})
@omni_route("videos.create")
async def create_video(request: Request):
    fields, images = await _video_inputs(request)
    check_request(request, fields)
    return await create_job(request, fields, images)


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
    return json_response(await delete_job(request, await _job(request, video_id)))
