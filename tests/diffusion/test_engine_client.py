"""The engine-core process and its client (engine/), on the real tiny Qwen-Image.

Offline `Omni` through the engine process gives the same pixels and resolved params as the
in-process default; bad input raises in the caller the error the pipeline raised; an abort
stops the work at the next step; a killed engine process fails its request with
StageUnavailable naming the stage and is restarted; nothing in the engine process imports
vLLM. The codec tests pin what crosses the boundary bit for bit.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_omni_plugin.diffusion.capabilities import Capabilities, Knob, UnsupportedField
from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.engine import codec
from vllm_omni_plugin.engine.errors import RequestAborted, StageUnavailable

STAGE_DEFAULTS = {"num_inference_steps": 2, "height": 64, "width": 64}


# ---- the codec ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                                   torch.float8_e4m3fn])
def test_tensors_cross_bit_for_bit(dtype):
    t = (torch.randn(3, 5) * 4).to(dtype)
    frames = codec.encode({"t": t, "empty": torch.empty(0, 2, dtype=dtype)})
    assert len(frames) == 3  # structure + one raw frame per tensor (an empty one too)
    out = codec.decode(frames)
    assert out["t"].dtype == dtype and torch.equal(out["t"].view(torch.uint8), t.view(torch.uint8))
    assert out["empty"].shape == (0, 2)


def test_images_arrays_and_dataclasses_round_trip():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8))
    images = [rgb, rgb.convert("RGBA"), rgb.convert("L"), rgb.convert("P")]
    request = SamplingParams(prompt="x", images=images, extra={"knob": (1.5, 2.5), "flag": True})
    caps = Capabilities(output="layers", input_images=(1, None), fields=frozenset({"height"}),
                        knobs={"k": Knob(tuple, 2)})
    value = {"request": request, "caps": caps, "array": np.arange(6, dtype=np.float16).reshape(2, 3)}
    out = codec.decode(codec.encode(value))
    assert out["request"] == request and out["caps"] == caps  # tuples stay tuples, frozensets frozensets
    assert isinstance(out["request"].extra["knob"], tuple)
    for a, b in zip(images, out["request"].images):
        assert a.mode == b.mode and np.array_equal(np.asarray(a.convert("RGBA")), np.asarray(b.convert("RGBA")))
    assert np.array_equal(out["array"], value["array"]) and out["array"].dtype == np.float16


def test_exceptions_keep_their_class_or_name():
    err = codec.decode(codec.encode(UnsupportedField("`layers` is not used", "layers")))
    assert type(err) is UnsupportedField and err.field == "layers" and str(err) == "`layers` is not used"

    class OutOfMemory(RuntimeError):  # a class the receiving side cannot import
        pass

    err = codec.decode(codec.encode(OutOfMemory("CUDA out of memory")))
    assert type(err).__name__ == "OutOfMemory" and isinstance(err, codec.RemoteError)
    assert "CUDA out of memory" in str(err)


def test_typed_stage_inputs_cross():
    from vllm_omni_plugin.families.glm_image.pipeline import GlmImagePrior

    prior = GlmImagePrior("req-1", tuple(range(6)), (2, 3))
    assert codec.decode(codec.encode(prior)) == prior


def test_unknown_types_are_refused_not_pickled():
    with pytest.raises(TypeError, match="cannot cross the engine-core boundary"):
        codec.encode({"x": object()})


# ---- Omni through the engine process ----------------------------------------------------
@pytest.fixture(scope="module")
def omnis(checkpoint):
    from vllm_omni_plugin import Omni

    path = str(checkpoint("qwen-image"))
    local = Omni(path, stage_defaults=STAGE_DEFAULTS)
    remote = Omni(path, stage_defaults=STAGE_DEFAULTS, engine_process=True)
    yield local, remote
    remote.shutdown()
    local.shutdown()


def _pixels(output) -> list[bytes]:
    return [np.asarray(img).tobytes() for img in output.images]


@pytest.mark.engine
def test_engine_process_gives_the_in_process_pixels(omnis):
    local, remote = omnis
    assert remote.client.vllm_imported is False  # principle 3, checked inside the engine process
    assert remote.client.pid not in (None, os.getpid()) and remote.engine is None
    assert remote.capabilities == local.capabilities
    cases = [
        (["a red cat"], SamplingParams(seed=3)),
        (["a red cat", "a blue dog", "a green tree"], SamplingParams(seed=5)),  # admitted and batched together
        (["two of them"], SamplingParams(seed=7, num_outputs_per_prompt=2, negative_prompt="blurry")),
    ]
    for prompts, params in cases:
        ours, theirs = local.generate(prompts, params), remote.generate(prompts, params)
        for a, b in zip(ours, theirs):
            assert _pixels(a) == _pixels(b)
            assert a.params == b.params and a.params.seed == params.seed


@pytest.mark.engine
def test_bad_input_raises_the_pipelines_error_in_the_caller(omnis):
    _, remote = omnis
    with pytest.raises(UnsupportedField) as refused:
        remote.generate({"prompt": "x", "layers": 3})
    assert refused.value.field == "layers"
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        remote.generate({"prompt": "x", "num_inference_steps": 0})


@pytest.mark.engine
def test_step_events_cross_only_for_a_listener_and_every_step_is_counted(omnis):
    _, remote = omnis
    client = remote.client
    counted: list[int] = []
    client.step_observer = lambda seconds, stepped: counted.append(stepped)
    try:
        quiet = client.submit(client.resolve(SamplingParams(prompt="quiet", seed=1, num_inference_steps=3)))
        client.wait(quiet, timeout=120)
        assert (quiet.step, quiet.total) == (0, 0)  # no step event came for it
        assert sum(counted) == 3  # its steps' metrics came with its final message

        seen: list[tuple[int, int]] = []
        heard = client.submit(client.resolve(SamplingParams(prompt="heard", seed=1, num_inference_steps=3)),
                              lambda step, total: seen.append((step, total)))
        client.wait(heard, timeout=120)
        assert seen == [(1, 3), (2, 3), (3, 3)] and sum(counted) == 6
    finally:
        client.step_observer = None


@pytest.mark.engine
def test_abort_stops_the_request_at_the_next_step(omnis):
    _, remote = omnis
    client = remote.client
    params = client.resolve(SamplingParams(prompt="long", seed=1, num_inference_steps=50))
    seen: list[int] = []

    def on_progress(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            client.abort(handle.request_id)

    handle = client.submit(params, on_progress)
    with pytest.raises(RequestAborted):
        client.wait(handle, timeout=120)
    assert 2 <= max(seen) < 50  # stopped at a step boundary soon after the abort, long before the end
    assert client.in_flight == 0
    (again,) = remote.generate("after the abort", SamplingParams(seed=1))  # the engine serves on
    assert again.images


@pytest.mark.engine
def test_killed_engine_process_fails_its_request_and_restarts(omnis):
    local, remote = omnis
    client = remote.client
    pid = client.pid
    params = client.resolve(SamplingParams(prompt="doomed", seed=1, num_inference_steps=200))

    def on_progress(step: int, total: int) -> None:
        if step == 1:
            os.kill(pid, signal.SIGKILL)

    handle = client.submit(params, on_progress)
    with pytest.raises(StageUnavailable) as died:
        client.wait(handle, timeout=120)
    message = str(died.value)
    assert "diffusion stage's engine process died" in message and str(pid) in message
    assert "SIGKILL" in message and handle.request_id in message
    # Down until the new process is ready, then the same pixels as the in-process engine.
    (out,) = _wait_restarted(remote)
    assert client.pid != pid and client.stats.restarts == 1 and client.health() is None
    (ref,) = local.generate("after the crash", SamplingParams(seed=2))
    assert _pixels(out) == _pixels(ref)


def _wait_restarted(remote, timeout: float = 300):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return remote.generate("after the crash", SamplingParams(seed=2))
        except StageUnavailable as e:  # while the new process loads: a 503-shaped refusal, not a hang
            assert "restarting" in str(e) and remote.client.status == "restarting"
        time.sleep(0.5)
    raise AssertionError("the engine process was not restarted in time")


@pytest.mark.engine
def test_an_engine_that_cannot_load_fails_start_with_its_cause(tmp_path):
    from vllm_omni_plugin.diffusion.workers import PipelineBuilder
    from vllm_omni_plugin.engine.client import EngineCoreClient, EngineStartError
    from vllm_omni_plugin.engine.spec import EngineSpec

    client = EngineCoreClient(EngineSpec(PipelineBuilder(str(tmp_path / "no-such-checkpoint"))))
    with pytest.raises(EngineStartError, match="diffusion stage's engine could not start") as failed:
        client.start()
    assert failed.value.__cause__ is not None and str(tmp_path) in str(failed.value)
    assert client.pid is None
