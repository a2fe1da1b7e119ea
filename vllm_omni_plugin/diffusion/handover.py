"""Typed stage inputs: what an earlier stage hands the diffusion stage for one request.

A stage that takes an input from the stage before it declares its type
(`DiffusionPipelineBase.stage_input_type`: BAGEL's `BagelContext`, GLM-Image's
`GlmImagePrior`); the input travels *with* its request
(`DiffusionEngine.add_request(request_id, params, stage_input)`), built by
exactly one function per hand-over (the family orchestrator's `hand_over`).
There is no side store to put it in and nothing to look up later, so an
input cannot wait for a request that never comes nor serve another request.

An input may leave its bulk where the stage before put it (BAGEL's context:
references to the KV store's shared-memory files, read by the DiT stage where
it runs) and then has `discard()`, which the orchestrator calls for a request
that ended before the stage read it.

`check_stage_input` is the one check, run when the request is added: a
missing, mistyped or mis-keyed input is a `StageInputError` naming the stage
and the request. It is our bug, never the client's (a 500, not a 400).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StageInput(Protocol):
    """What every stage input carries: the id of the request it belongs to (principle 6)."""

    request_id: str


class StageInputError(RuntimeError):
    """A request reached a stage without the input that stage needs, or with one it cannot take."""


def check_stage_input(pipeline: Any, request_id: str, stage_input: Any) -> None:
    """Raise StageInputError unless `stage_input` is what `pipeline`'s stage takes for `request_id`.

    Args:
        pipeline: the stage's pipeline (its `stage_input_type`, `stage_input_required`, `family`).
        request_id: the request the input is handed over with.
        stage_input: the input, or None.
    """
    expected = getattr(pipeline, "stage_input_type", None)
    stage = f"the {getattr(pipeline, 'family', type(pipeline).__name__)} diffusion stage"
    if stage_input is None:
        if expected is not None and getattr(pipeline, "stage_input_required", False):
            raise StageInputError(f"request {request_id}: {stage} needs a {expected.__name__} from the stage "
                                  "before it; none was handed over")
        return
    if expected is None:
        raise StageInputError(f"request {request_id}: {stage} takes no stage input, got a "
                              f"{type(stage_input).__name__}")
    if not isinstance(stage_input, expected):
        raise StageInputError(f"request {request_id}: {stage} takes a {expected.__name__}, got a "
                              f"{type(stage_input).__name__}")
    if stage_input.request_id != request_id:
        raise StageInputError(f"request {request_id}: {stage} was handed the {expected.__name__} of request "
                              f"{stage_input.request_id}")
