"""What the serving modules share: the runtime and id of a request, running it with disconnect-abort,
and the `omni` block of an answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, TypeVar

from fastapi import Request

from ...diffusion.output import DiffusionOutput
from ...diffusion.params import ResolvedParams
from ...orchestrator.engine_loop import ProgressFn
from ..errors import OmniHTTPError, error_body, to_http_error

logger = logging.getLogger("vllm.omni_plugin.server")

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away; its work was aborted. Nobody reads the response."""


def runtime(request: Request):
    """The `OmniRuntime` of the app `request` came to."""
    return request.app.state.omni


def request_id(request: Request) -> str:
    """This request's id: made once per request by `omni_route`, unique (it keys engine work),
    returned in the `X-Request-Id` header and in `omni.request_id`."""
    return request.state.omni_request_id


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (each runtime turns the
    cancellation into an abort of its engine work) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def generate(request: Request, params: ResolvedParams, on_progress: ProgressFn | None = None) -> DiffusionOutput:
    """Run one image request (diffusion engine, or AR -> DiT); abort it if the client disconnects first."""
    work = runtime(request).stages.generate_image(params, on_progress, request_id=request_id(request))
    return await until_disconnect(request, work)


def resolved_json(params: ResolvedParams, request_id: str | None = None, ignored: tuple[str, ...] = (),
                  dtypes: dict[str, str] | None = None) -> dict[str, Any]:
    """The `omni` block of a response: the parameters that ran, the fields accepted without effect,
    and the dtype each stage ran in (`DiffusionOutput.dtypes`)."""
    out: dict[str, Any] = {"resolved": params.public_dict(), "ignored": list(ignored)}
    if dtypes is not None:
        out["dtypes"] = dict(dtypes)
    if request_id is not None:
        out["request_id"] = request_id
    return out


def streamed_error(exc: BaseException, request_id: str, what: str) -> dict[str, Any]:
    """The OpenAI error body of a failure after a stream started (its last event); a 5xx is logged
    with its traceback, under `what` (e.g. "image")."""
    try:
        err = to_http_error(exc)
    except TypeError:
        err = OmniHTTPError(500, f"internal server error (request {request_id})")
    if err.status >= 500:
        logger.error("omni: streamed %s request %s failed", what, request_id, exc_info=exc)
    return error_body(err.status, err.message, err.param)
