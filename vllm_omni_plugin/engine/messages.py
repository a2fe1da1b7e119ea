"""The messages between the engine client and the engine-core process (msgspec structs).

Client -> core (the input socket):   AddRequests, Abort, Shutdown
Client -> core (the RPC socket):     Call -> Reply (resolve a request, ...)
Core -> client (the output socket):  Ready | StartFailed once, then Events

Payload fields typed `Any` hold `codec.pack` trees: what they reference (tensors,
images, arrays) travels as raw frames after the message's first frame.
`send` / `recv` do the framing.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from . import codec


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    params: Any  # ResolvedParams (packed)
    stage_input: Any = None  # a typed stage input (packed), or None
    wants_steps: bool = False  # its caller listens to its progress: send its step events


class AddRequests(msgspec.Struct, tag=True, array_like=True):
    """Requests admitted together (they reach the engine before one step plans)."""

    requests: list[AddRequest]


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class Call(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: str  # "resolve" | "ping"
    arg: Any = None


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: Any = None
    error: Any = None  # a packed exception


class Ready(msgspec.Struct, tag=True, array_like=True):
    pid: int
    info: Any  # PipelineInfo (packed)
    vllm_imported: bool  # whether anything in the engine process imported vLLM (principle 3)


class StartFailed(msgspec.Struct, tag=True, array_like=True):
    error: Any  # a packed exception
    traceback: str


class Event(msgspec.Struct, array_like=True):
    kind: str  # "step" | "partial" | "finished" | "aborted" | "error"
    request_id: str
    step: int = 0
    total: int = 0
    output: Any = None  # DiffusionOutput (packed): its images cross as raw frames (codec.py)
    error: Any = None  # a packed exception
    index: int = 0  # "partial": the partial image's index


class Events(msgspec.Struct, tag=True, array_like=True):
    """What engine steps produced since the last message.

    steps    (wall seconds, requests stepped) of each step since the last message (the step
             metrics); a step whose only events are unobserved step events sends nothing
             unless the number of running requests changed, so these ride on a later message
    events   step events of requests whose caller listens (`AddRequest.wants_steps`), and
             every request's final event
    running  requests the engine holds state for, after the last step
    """

    steps: list[tuple[float, int]]
    events: list[Event]
    running: int = 0


ToCore = Union[AddRequests, Abort, Shutdown]
FromCore = Union[Ready, StartFailed, Events]

_encoder = msgspec.msgpack.Encoder()
_decoders = {
    "to_core": msgspec.msgpack.Decoder(ToCore),
    "from_core": msgspec.msgpack.Decoder(FromCore),
    "call": msgspec.msgpack.Decoder(Call),
    "reply": msgspec.msgpack.Decoder(Reply),
}


def frames_of(message: msgspec.Struct, buffers: list[Any]) -> list[Any]:
    """[the message, raw buffer 1, ...]: `buffers` as filled by `codec.pack` of its payloads."""
    return [_encoder.encode(message), *buffers]


def parse(kind: str, frames: list[Any]) -> tuple[Any, list[Any]]:
    """(the message, the frame buffers its packed payloads reference); kind: a key of `_decoders`."""
    buffers = codec.frame_buffers(frames)
    return _decoders[kind].decode(buffers[0]), buffers
