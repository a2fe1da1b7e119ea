"""One class per benchmark task: what it sends and how it reads the answer.

    images   POST /v1/images/generations (JSON)
    edits    POST /v1/images/edits (multipart upload of the input image, as OpenAI's client sends it)
             (both with --stream: `stream: true` + `partial_images`, the server-sent events read as
             they arrive; the time to the first partial image event is the request's `ttfp_s`)
    chat     POST /v1/chat/completions asking for images; with an input image it is an image part
    videos   POST /v1/videos, then GET /v1/videos/{id} every --poll-interval until it settles, then
             GET .../content (the latency of a video is create -> the mp4 downloaded)

Every request carries its own seed (the run's --seed + its index), so a run is reproducible and two
runs with the same flags ask for the same images.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TASKS = ("images", "edits", "chat", "videos")
_SETTLED = ("completed", "failed", "cancelled")


@dataclass
class RequestResult:
    """What one benchmark request did. Times are seconds from the start of the timed run."""

    index: int
    ok: bool
    start_s: float
    latency_s: float
    #: the HTTP status of the failing answer ("429"), or what went wrong without one
    #: ("timeout", "connection", "video_failed", "bad_response")
    error_code: str | None = None
    error: str | None = None
    outputs: int = 0  # images (or videos) in the answer
    request_id: str | None = None
    #: time to the first partial image event (--stream with --partial-images > 0); None otherwise
    ttfp_s: float | None = None
    #: md5 of each output (decoded RGB pixels of an image, the bytes of an mp4); detailed runs only
    output_md5: list[str] = field(default_factory=list)
    resolved: dict[str, Any] | None = None  # the answer's omni.resolved; detailed runs only


@dataclass
class Workload:
    """The request fields every task shares.

    `extra_body` is merged into every request body last (any omni field: num_frames, guidance_scale...).
    """

    model: str
    size: str | None = None
    steps: int | None = None
    n: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None  # the input image (PNG/JPEG bytes) of edits, and of chat when given
    poll_interval_s: float = 0.5
    detailed: bool = False
    #: images and edits: ask for server-sent events with this many partial images (None: no stream)
    partial_images: int | None = None

    def fields(self, prompt: str, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "seed": seed}
        if self.partial_images is not None:
            body["stream"], body["partial_images"] = True, self.partial_images
        if self.size is not None:
            body["size"] = self.size
        if self.steps is not None:
            body["num_inference_steps"] = self.steps
        if self.n is not None:
            body["n"] = self.n
        return {**body, **self.extra_body}

    async def send(self, client: httpx.AsyncClient, prompt: str, seed: int) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request; returns (the JSON answer, the raw outputs). Raises `RequestFailed`."""
        raise NotImplementedError


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _check(r: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx answer; otherwise `RequestFailed` with the status and the error message."""
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise RequestFailed(str(r.status_code), message)
    try:
        return r.json()
    except ValueError:
        raise RequestFailed("bad_response", f"not JSON: {r.text[:200]!r}") from None


def _b64_images(body: dict[str, Any]) -> list[bytes]:
    try:
        return [base64.b64decode(d["b64_json"]) for d in body["data"]]
    except (KeyError, TypeError) as e:
        raise RequestFailed("bad_response", f"no data[].b64_json in the answer ({e})") from None


async def _streamed(client: httpx.AsyncClient, path: str, **kwargs: Any) -> tuple[dict[str, Any], list[bytes]]:
    """POST an image request with `stream: true`; read its events as they come. Returns
    ({"first_partial_at": perf_counter of the first partial event or None, "partial_images": count},
    the completed images)."""
    first, partials, images = None, 0, []
    async with client.stream("POST", path, **kwargs) as r:
        if r.status_code >= 400:
            await r.aread()
            _check(r)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RequestFailed(str(event["error"].get("code", "stream_error")), event["error"].get("message", ""))
            if event.get("type", "").endswith(".partial_image"):
                first = first if first is not None else time.perf_counter()
                partials += 1
            elif event.get("type", "").endswith(".completed"):
                images.append(base64.b64decode(event["b64_json"]))
    if not images:
        raise RequestFailed("bad_response", "the stream ended without a completed event")
    return {"first_partial_at": first, "partial_images": partials}, images


class Images(Workload):
    async def send(self, client, prompt, seed):
        if self.partial_images is not None:
            return await _streamed(client, "/v1/images/generations", json=self.fields(prompt, seed))
        body = _check(await client.post("/v1/images/generations", json=self.fields(prompt, seed)))
        return body, _b64_images(body)


class Edits(Workload):
    async def send(self, client, prompt, seed):
        if self.image is None:
            raise ValueError("the edits task needs an input image")
        form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.fields(prompt, seed).items()}
        files = {"image": ("input.png", self.image, "image/png")}
        if self.partial_images is not None:
            form["stream"] = "true"
            return await _streamed(client, "/v1/images/edits", data=form, files=files)
        body = _check(await client.post("/v1/images/edits", data=form, files=files))
        return body, _b64_images(body)


class Chat(Workload):
    async def send(self, client, prompt, seed):
        fields = self.fields(prompt, seed)
        fields.pop("prompt")
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        if self.image is not None:
            url = "data:image/png;base64," + base64.b64encode(self.image).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        body = _check(await client.post("/v1/chat/completions",
                                        json={**fields, "messages": [{"role": "user", "content": content}]}))
        try:
            parts = body["choices"][0]["message"]["content"]
            urls = [p["image_url"]["url"] for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
        except (KeyError, IndexError, TypeError) as e:
            raise RequestFailed("bad_response", f"no image parts in the chat answer ({e})") from None
        return body, [base64.b64decode(u.split(",", 1)[1]) for u in urls]


class Videos(Workload):
    async def send(self, client, prompt, seed):
        job = _check(await client.post("/v1/videos", json=self.fields(prompt, seed)))
        video_id = job["id"]
        while job.get("status") not in _SETTLED:
            await asyncio.sleep(self.poll_interval_s)
            job = _check(await client.get(f"/v1/videos/{video_id}"))
        if job["status"] != "completed":
            error = job.get("error") or {}
            raise RequestFailed("video_failed", f"video {video_id} {job['status']}: {error.get('message', '')}")
        r = await client.get(f"/v1/videos/{video_id}/content")
        if r.status_code >= 400:
            _check(r)
        return job, [r.content]


WORKLOADS: dict[str, type[Workload]] = {"images": Images, "edits": Edits, "chat": Chat, "videos": Videos}


def output_md5(data: bytes, task: str) -> str:
    """md5 of an output: the decoded RGB pixels of an image (encoder-independent), the bytes of an mp4."""
    if task == "videos":
        return hashlib.md5(data).hexdigest()
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    return hashlib.md5(img.convert("RGB").tobytes()).hexdigest()


async def timed_request(workload: Workload, task: str, client: httpx.AsyncClient, index: int, prompt: str,
                        seed: int, t0: float) -> RequestResult:
    """Send one request and time it; every failure becomes a failed `RequestResult`, never an exception."""
    start = time.perf_counter()
    result = RequestResult(index=index, ok=False, start_s=start - t0, latency_s=0.0)
    try:
        body, outputs = await workload.send(client, prompt, seed)
    except RequestFailed as e:
        result.error_code, result.error = e.code, str(e)
    except httpx.TimeoutException as e:
        result.error_code, result.error = "timeout", f"{type(e).__name__}: {e}"
    except httpx.TransportError as e:
        result.error_code, result.error = "connection", f"{type(e).__name__}: {e}"
    else:
        result.ok, result.outputs = True, len(outputs)
        if body.get("first_partial_at") is not None:
            result.ttfp_s = body["first_partial_at"] - start
        omni = body.get("omni") or {}
        result.request_id = omni.get("request_id") or body.get("id")
        if workload.detailed:
            result.resolved = omni.get("resolved") or body.get("resolved")
            result.output_md5 = await asyncio.to_thread(lambda: [output_md5(o, task) for o in outputs])
    result.latency_s = time.perf_counter() - start
    return result
