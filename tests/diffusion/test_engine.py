"""Engine: stepwise loop == generate() == batched with others; shapes; abort; progress."""

from __future__ import annotations

import numpy as np

from pixels import assert_pixels_close
from vllm_omni_plugin.diffusion import DiffusionEngine, EngineConfig, SamplingParams


def req(prompt, seed, h=64, w=96, steps=3, **kw):
    return SamplingParams(prompt=prompt, height=h, width=w, num_inference_steps=steps, seed=seed, output_type="np",
                          **kw)


def images(output):
    return np.stack(output.images)


def test_stepwise_loop_equals_generate_bit_for_bit(pipeline):
    pipe = pipeline("qwen-image")
    params = pipe.resolve(req("a red cat", 11, negative_prompt="blurry", true_cfg_scale=4.0))
    state = pipe.prepare(params, "loop")
    assert state.scheduler is not pipe.pipe.scheduler
    while not state.done:
        preds = pipe.denoise_step([state])
        pipe.scheduler_step([state], preds)
    looped = pipe.decode(state)
    generated = pipe.generate(params)
    assert np.array_equal(images(looped), images(generated))


def test_batched_with_other_requests_equals_single(pipeline):
    """Batched rows see other rows' padded text and another GEMM batch size: ~1e-6 in float, <= 1 uint8 level."""
    pipe = pipeline("qwen-image")
    requests = {
        "cfg": req("a red cat", 1, negative_prompt="blurry", true_cfg_scale=4.0),
        "long": req("a much longer prompt about a blue dog on a beach at sunset", 2, num_outputs_per_prompt=2),
        "late": req("a third request", 3, steps=4, negative_prompt=" ", true_cfg_scale=3.0),
    }
    single = {k: images(pipe.generate(v)) for k, v in requests.items()}
    engine = DiffusionEngine(pipe)
    for k, v in requests.items():
        engine.add_request(k, v)
    final = engine.run()
    assert max(engine.stats.batch_sizes) == 3  # all three shared forwards
    for k in requests:
        assert final[k].kind == "finished"
        out = images(final[k].output)
        assert np.abs(out - single[k]).max() < 1e-4
        assert_pixels_close(out, single[k], 1)
    # the stepwise loop inside the engine carries the resolved params
    assert final["late"].output.params.num_inference_steps == 4


def test_batched_with_unbatched_cfg_is_exact_for_equal_layouts(pipeline):
    """Same text layout, one request per forward group: nothing is padded or re-blocked."""
    pipe = pipeline("qwen-image", batch_cfg=False)
    a, b = req("same length", 5), req("same length", 6)
    single = [images(pipe.generate(p)) for p in (a, b)]
    engine = DiffusionEngine(pipe, EngineConfig(max_batch_tokens=1))  # budget 1: one request per forward
    engine.add_request("a", a)
    engine.add_request("b", b)
    final = engine.run()
    assert engine.stats.batch_sizes == [1] * 4 + [1] * 2  # interleaved a, b, a, b, a, b
    for rid, ref in zip("ab", single):
        assert np.array_equal(images(final[rid].output), ref)


def test_two_concurrent_requests_of_different_shapes(pipeline):
    pipe = pipeline("qwen-image")
    wide, tall = req("wide", 1, h=64, w=96, steps=3), req("tall", 2, h=96, w=64, steps=2)
    single = {"wide": images(pipe.generate(wide)), "tall": images(pipe.generate(tall))}
    engine = DiffusionEngine(pipe)
    engine.add_request("wide", wide)
    engine.add_request("tall", tall)
    order = []
    final = engine.run(lambda e: order.append((e.kind, e.request_id)))
    assert engine.stats.batch_sizes == [1] * 5  # different latent shapes never share a forward
    steps = [rid for kind, rid in order if kind == "step"]
    assert steps[:4] == ["wide", "tall", "wide", "tall"]  # interleaved, nobody starves
    for rid, ref in single.items():
        assert final[rid].output.images[0].shape == ref[0].shape
        assert np.array_equal(images(final[rid].output), ref)


def test_token_budget_bounds_a_batch(pipeline):
    pipe = pipeline("qwen-image")
    cost = pipe.prepare(pipe.resolve(req("p", 0, h=32, w=32, steps=2)), "probe").step_tokens
    engine = DiffusionEngine(pipe, EngineConfig(max_batch_tokens=2 * cost))
    for i in range(3):
        engine.add_request(f"r{i}", req("p", i, h=32, w=32, steps=2))
    engine.run()
    assert max(engine.stats.batch_sizes) == 2


def test_abort_frees_the_slot_and_others_are_unaffected(pipeline):
    pipe = pipeline("qwen-image")
    keep = {"a": req("first", 1, steps=3), "c": req("third", 3, steps=3)}
    single = {k: images(pipe.generate(v)) for k, v in keep.items()}
    engine = DiffusionEngine(pipe)
    engine.add_request("a", keep["a"])
    engine.add_request("b", req("second", 2, steps=3))
    engine.add_request("c", keep["c"])
    events = engine.step()
    assert {e.request_id for e in events if e.kind == "step"} == {"a", "b", "c"}
    state_b = engine._running["b"].state
    engine.abort("b")
    events = engine.step()
    assert [e.kind for e in events if e.request_id == "b"] == ["aborted"]
    assert "b" not in engine._running and state_b.latents.numel() == 0 and state_b.scheduler is None
    assert engine.num_running == 2
    final = engine.run()
    assert set(final) == {"a", "c"}
    for rid, ref in single.items():
        assert_pixels_close(images(final[rid].output), ref, 1)


def test_abort_of_a_waiting_request(pipeline):
    engine = DiffusionEngine(pipeline("qwen-image"))
    engine.add_request("w", req("p", 0, h=32, w=32, steps=2))
    engine.abort("w")
    assert [(e.kind, e.request_id) for e in engine.step()] == [("aborted", "w")]
    assert not engine.has_unfinished()


def test_progress_events_per_step(pipeline):
    engine = DiffusionEngine(pipeline("qwen-image"))
    engine.add_request("p", req("p", 0, h=32, w=32, steps=3))
    events = []
    engine.run(events.append)
    assert [(e.kind, e.step, e.total) for e in events] == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3),
                                                         ("finished", 0, 0)]


def test_bad_request_fails_at_submission_and_engine_goes_on(pipeline):
    engine = DiffusionEngine(pipeline("qwen-image-edit"))
    try:
        engine.add_request("x", SamplingParams(prompt="no image"))
    except ValueError as exc:
        assert "input image" in str(exc)
    else:
        raise AssertionError("expected a ValueError")
    assert not engine.has_unfinished()


def test_wan_requests_in_different_experts_do_not_share_a_forward(pipeline):
    pipe = pipeline("wan2.2-t2v")
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=4, output_type="np")
    a, b = SamplingParams(prompt="a", seed=1, **kw), SamplingParams(prompt="b", seed=2, **kw)
    single = [np.asarray(pipe.generate(p).videos) for p in (a, b)]
    engine = DiffusionEngine(pipe)
    engine.add_request("a", a)
    engine.step()
    engine.step()  # a is now in its low-noise steps
    engine.add_request("b", b)
    final = engine.run()
    # a's low-noise steps and b's high-noise steps need different experts: never one forward
    assert engine.stats.batch_sizes == [1] * 8
    for rid, ref in zip("ab", single):
        assert_pixels_close(np.asarray(final[rid].output.videos), ref, 1)
    together = DiffusionEngine(pipe)
    together.add_request("a", a)
    together.add_request("b", b)
    final = together.run()
    assert together.stats.batch_sizes == [2] * 4  # same expert at every step: shared forwards
    for rid, ref in zip("ab", single):
        assert_pixels_close(np.asarray(final[rid].output.videos), ref, 1)


def test_output_does_not_depend_on_process_wide_attention_switches(pipeline):
    """Importing vLLM's server turns cuDNN SDPA off process-wide; served images then differed from
    offline ones on an H200. The engine pins its SDPA kernels, so global switches change nothing."""
    import torch

    params = SamplingParams(prompt="a red cat", height=64, width=64, num_inference_steps=2, seed=3)

    def run() -> np.ndarray:
        engine = DiffusionEngine(pipeline("qwen-image"))
        engine.add_request("r", params)
        return np.asarray(engine.run()["r"].output.images[0])

    before = run()
    flash, efficient = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)  # on the CPU this switches SDPA to the math kernel
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        after = run()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_mem_efficient_sdp(efficient)
    np.testing.assert_array_equal(after, before)


def test_abort_stops_a_monolithic_run_at_its_next_step(pipeline):
    """A generic (whole-request) run has no engine step boundary: the abort lands at the
    pipeline's next denoise step instead of after all of them."""
    import threading
    import time

    engine = DiffusionEngine(pipeline("qwen-image", generic=True))
    total = 400
    engine.add_request("m", req("long", 0, h=32, w=32, steps=total))
    events = []
    runner = threading.Thread(target=lambda: events.extend(engine.step()))
    runner.start()
    deadline = time.monotonic() + 60
    while engine.num_running == 0 and time.monotonic() < deadline:  # admitted: its run has begun
        time.sleep(0.001)
    time.sleep(0.2)
    engine.abort("m")
    runner.join(120)
    steps = [e.step for e in events if e.kind == "step"]
    assert [e.kind for e in events if e.kind != "step"] == ["aborted"]
    assert 0 < len(steps) < total and steps == list(range(1, len(steps) + 1))
    assert not engine.has_unfinished() and engine.num_running == 0
    final = engine.run() if engine.add_request("next", req("next", 1, h=32, w=32, steps=2)) else {}
    assert final["next"].kind == "finished"  # the engine goes on
