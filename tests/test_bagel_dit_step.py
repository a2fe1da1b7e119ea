"""BAGEL's DiT step: CFG branches batched in one forward, regional compile, no host syncs.

Oracles: the same step run one forward per (request, branch) block, and eager
for the compiled decoder layer. CPU float32 on the tiny checkpoint; the full
pipelines against tests/reference stay in test_bagel_generation.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from host_sync import SyncRecorder

from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams
from vllm_omni_plugin.diffusion.acceleration import DitOptions, apply_dit_options
from vllm_omni_plugin.families.bagel.pipeline import load_bagel_pipeline

STEPS = 6  # shift 1: flow times 1, .8, .6, .4, .2 -> CFG on the first three steps, off on the last two


def _image(seed: int) -> Image.Image:  # 56x40 -> generated at 48x32
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("bagel")


@pytest.fixture(scope="module")
def pipe(ckpt):  # eager, the oracle of the compiled one
    return load_bagel_pipeline(ckpt, dtype=torch.float32, device="cpu")


def _states(pipe, requests: dict[str, SamplingParams]):
    return [pipe.prepare(pipe.resolve(p), rid) for rid, p in requests.items()]


REQUESTS = {
    # contexts of different lengths in one batch: cond 5 tokens vs an empty cfg_text (text2img),
    # two prompts of different lengths, an img2img request with three branches
    "t2i": {"a": SamplingParams(prompt="a red cat", height=32, width=48, seed=1)},
    "t2i-neg": {"a": SamplingParams(prompt="a red cat on a mat", negative_prompt="blurry", height=64, width=32, seed=2)},
    "two": {"a": SamplingParams(prompt="a red cat", height=32, width=32, seed=3),
            "b": SamplingParams(prompt="a much longer prompt about a blue dog on a chair", height=32, width=32, seed=4)},
    "i2i": {"a": SamplingParams(prompt="make it blue", images=[_image(0)], seed=5),
            "b": SamplingParams(prompt="make it a much greener picture", images=[_image(1)], seed=6)},
}


@pytest.mark.parametrize("mode", ["padded", "per_row", "varlen"])
@pytest.mark.parametrize("case", list(REQUESTS))
def test_batched_branches_equal_one_forward_per_branch(pipe, case, mode):
    """Every step's velocity of the one batched forward == one forward per (request, branch) block,
    with the rows' contexts padded + masked or attended row by row."""
    pipe.attention_mode = mode
    requests = {rid: dataclasses.replace(p, num_inference_steps=STEPS, extra={"timestep_shift": 1.0})
                for rid, p in REQUESTS[case].items()}
    states = _states(pipe, requests)
    lengths = {n: b.num_tokens for s in states for n, b in s.extras["branches"].items()}
    assert len(set(lengths.values())) > 1  # padded, masked rows are exercised
    worst, forwards = 0.0, []
    for _ in range(STEPS - 1):
        pipe.batch_cfg = True
        batched = pipe.denoise_step(states)
        with torch.no_grad():  # the oracle: each block alone, no padding, no mask, no packing (one SDPA)
            pipe.attention_mode = "padded"
            alone = {(id(s), n): pipe._forward([(s, n)])[0] for s in states for n in pipe._needed(s)}
            pipe.attention_mode = mode
        pipe.batch_cfg = False
        per_branch = pipe.denoise_step(states)
        for s, v, w in zip(states, batched, per_branch):
            single = pipe._combine(s, {n: alone[(id(s), n)] for n in pipe._needed(s)})
            worst = max(worst, (v - single).abs().max().item(), (w - single).abs().max().item())
        forwards.append(sum(len(pipe._needed(s)) for s in states))
        pipe.scheduler_step(states, batched)
    pipe.batch_cfg, pipe.attention_mode = True, "auto"
    assert worst <= 1e-5, worst
    assert max(forwards) > len(states)  # CFG ran (several branches per state) ...
    assert min(forwards) == len(states)  # ... and was off on the last steps


def test_auto_attention_mode_pads_similar_lengths_only(pipe):
    """text2img (prompt vs empty context, beside the image tokens): padded; img2img (image + prompt
    vs prompt only): row by row."""
    def mode(case: str) -> str:
        states = _states(pipe, REQUESTS[case])
        rows = [b for s in states for b in s.extras["branches"].values()]
        return pipe._attention_mode(rows, states[0].latents.shape[1] + 2)

    assert (mode("t2i"), mode("i2i")) == ("padded", "per_row")


def test_auto_attention_mode_on_cuda_never_masks():
    """On CUDA a mask would leave the flash kernel: rows of unequal contexts are packed for torch's
    varlen kernel, equal ones stay padded (no mask); the CPU rule is the padding-waste one. Pure rule,
    synthetic lengths."""
    from vllm_omni_plugin.families.bagel.pipeline import auto_attention_mode

    t2i_1024 = ([20, 0], 4098)  # prompt vs empty context beside a 1024^2 image's tokens
    assert auto_attention_mode(*t2i_1024, "cpu") == "padded"
    assert auto_attention_mode(*t2i_1024, "cuda") == "varlen"
    assert auto_attention_mode([33, 33, 33], 1026, "cuda") == "padded"
    assert auto_attention_mode([600, 560, 40], 258, "cpu") == "per_row"
    assert auto_attention_mode([600, 560, 40], 258, "cuda") == "varlen"


def test_varlen_packing_and_kernel_choice(pipe):
    """The packed layout the CUDA kernel reads: cu_seqlens (device) == the host offsets the CPU kernel
    slices by, each row's context at its offset followed by its image tokens' slots (written by the
    step), and the kernel torch's varlen_attn on CUDA half precision only."""
    from vllm_omni_plugin.families.bagel.dit.attention import (flash_varlen_attention, has_flash_varlen,
                                                               pack_context, segment_attention, varlen_kernel)

    states = _states(pipe, REQUESTS["i2i"])
    rows = [b for s in states for b in s.extras["branches"].values()]
    n_query = states[0].latents.shape[1] + 2
    packed = pack_context(rows, n_query, pipe.model.config.layers, segment_attention)
    lengths = [b.num_tokens + n_query for b in rows]
    assert packed.cu_k.dtype == packed.cu_q.dtype == torch.int32
    assert packed.cu_k.tolist() == list(packed.offsets_k) == [0, *np.cumsum(lengths).tolist()]
    assert packed.cu_q.tolist() == list(packed.offsets_q) == [n_query * r for r in range(len(rows) + 1)]
    assert (packed.max_q, packed.max_k) == (n_query, max(lengths))
    for r, b in enumerate(rows):
        start = packed.offsets_k[r]
        assert torch.equal(packed.keys[1][start:start + b.num_tokens], b.keys[1])
        assert torch.equal(packed.values[0][start:start + b.num_tokens], b.values[0])
        assert packed.slots[r * n_query:(r + 1) * n_query].tolist() == list(range(start + b.num_tokens,
                                                                                   packed.offsets_k[r + 1]))
    assert has_flash_varlen()  # torch >= 2.10 (the GPU box's 2.11 too)
    assert varlen_kernel(torch.device("cuda"), torch.bfloat16) is flash_varlen_attention
    assert varlen_kernel(torch.device("cuda"), torch.float32) is segment_attention  # flash: half precision only
    assert varlen_kernel(torch.device("cpu"), torch.bfloat16) is segment_attention


def test_flash_varlen_call_on_the_meta_device():
    """The CUDA kernel's call as the packed path makes it, traced through torch's own fake kernel of
    varlen_attn on the meta device (BAGEL's 28 / 4 heads, d 128, bf16): the wrapper's argument checks
    pass (grouped-query heads need enable_gqa in this torch) and the unpacked output has the rows'
    shape. The numbers themselves only the GPU computes (benchmarks/README.md, --attention)."""
    from torch.nn.attention.varlen import varlen_attn

    from vllm_omni_plugin.families.bagel.dit.attention import flash_varlen_attention, pack_context
    from vllm_omni_plugin.families.bagel.dit.context import BranchKV

    meta = {"device": "meta", "dtype": torch.bfloat16}
    rows = [BranchKV((torch.empty(n, 4, 128, **meta),), (torch.empty(n, 4, 128, **meta),), n) for n in (40, 0, 7)]
    packed = pack_context(rows, 10, 1, flash_varlen_attention)
    q, k = torch.empty(3, 10, 28, 128, **meta), torch.empty(3, 10, 4, 128, **meta)
    out = packed.attend(0, q, k, k)
    assert (out.shape, out.device.type, out.dtype) == ((3, 10, 28 * 128), "meta", torch.bfloat16)
    with pytest.raises(ValueError, match="enable_gqa"):  # the check enable_gqa answers is live
        varlen_attn(q.flatten(0, 1), packed.keys[0], packed.values[0], packed.cu_q, packed.cu_k, 10, 50)


def test_cfg_batch_option_and_engine_batches_requests(pipe):
    """dit_options cfg_batch: false selects the per-branch path; both give the same images, and the
    engine runs concurrent requests' rows in the same forward either way."""
    requests = REQUESTS["two"]
    out = {}
    for cfg_batch in (True, False):
        apply_dit_options(pipe, DitOptions.from_dict({"cfg_batch": cfg_batch}))
        assert pipe.batch_cfg is cfg_batch
        engine = DiffusionEngine(pipe)
        for rid, p in requests.items():
            engine.add_request(rid, dataclasses.replace(p, num_inference_steps=STEPS, output_type="latent"))
        final = engine.run()
        assert set(engine.stats.batch_sizes) == {2}
        out[cfg_batch] = {rid: final[rid].output.latents for rid in requests}
    for rid in requests:
        assert (out[True][rid] - out[False][rid]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="cfg_batch"):
        DitOptions.from_dict({"cfg_batch": "no"})


def test_attention_mode_option(pipe):
    """dit_options attention_mode reaches the pipeline; unknown modes are refused; the engine's images
    are the same in every mode."""
    out = {}
    try:
        for mode in ("padded", "per_row", "varlen"):
            apply_dit_options(pipe, DitOptions.from_dict({"attention_mode": mode}))
            assert pipe.attention_mode == mode
            engine = DiffusionEngine(pipe)
            for rid, p in REQUESTS["i2i"].items():
                engine.add_request(rid, dataclasses.replace(p, num_inference_steps=STEPS, output_type="latent"))
            final = engine.run()
            out[mode] = {rid: final[rid].output.latents for rid in REQUESTS["i2i"]}
    finally:
        apply_dit_options(pipe, DitOptions())
    assert pipe.attention_mode == "auto"
    for rid in REQUESTS["i2i"]:
        for mode in ("per_row", "varlen"):
            assert (out[mode][rid] - out["padded"][rid]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="attention_mode"):
        DitOptions.from_dict({"attention_mode": "masked"})


@pytest.mark.parametrize("batch_cfg,mode", [(True, "auto"), (False, "auto"), (True, "padded"), (True, "per_row"),
                                            (True, "varlen")])
def test_no_host_sync_inside_a_step(pipe, batch_cfg, mode):
    """denoise_step + scheduler_step of text2img and img2img requests read no device value back, in
    every attention mode (varlen: cu_seqlens and the slots built with the batch layout, from host
    lengths)."""
    pipe.batch_cfg, pipe.attention_mode = batch_cfg, mode
    try:
        states = _states(pipe, {"a": SamplingParams(prompt="a red cat", height=32, width=32, seed=1,
                                                     num_inference_steps=4, extra={"cfg_interval": (0.0, 1.0)}),
                                "b": SamplingParams(prompt="a much longer prompt about a blue dog", height=32,
                                                    width=32, seed=2, num_inference_steps=4,
                                                    extra={"timestep_shift": 1.0})})
        for step in range(3):  # the first step builds the batch layout, the last runs without CFG for "b"
            with SyncRecorder() as rec:
                preds = pipe.denoise_step(states)
                pipe.scheduler_step(states, preds)
            assert rec.seen == [], (step, rec.seen)
        # the recorder sees what it should: one .item() is one _local_scalar_dense
        with SyncRecorder() as rec:
            states[0].latents.sum().item()
        assert rec.seen == ["aten._local_scalar_dense.default"]
    finally:
        pipe.batch_cfg, pipe.attention_mode = True, "auto"


@pytest.mark.parametrize("mode", ["auto", "varlen"])
def test_regional_compile_matches_eager_and_does_not_recompile(ckpt, pipe, mode):
    """compile="regional": the two token-wise regions of the MoT layer compile in the first step
    (one graph per region and expert weight layout) and nothing recompiles after it -- not when CFG
    turns off (1 row instead of 2), nor for a second request of another prompt length and image size;
    with the rows packed for the varlen kernel (attention stays eager between the regions) too."""
    from torch._dynamo.utils import counters

    compiled = load_bagel_pipeline(ckpt, dtype=torch.float32, device="cpu")
    apply_dit_options(compiled, DitOptions(compile="regional", attention_mode=mode))
    assert compiled.attention_mode == mode
    assert compiled.decoder.compiled and not pipe.decoder.compiled
    torch._dynamo.reset()
    counters.clear()

    def graphs() -> tuple[int, int]:
        return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())

    # 4 flow times -> 3 steps at t = 1, 2/3, 1/3: CFG (interval (0.4, 1]) on, on, off
    requests = [SamplingParams(prompt="a red cat", height=32, width=32, seed=1, num_inference_steps=4,
                               extra={"timestep_shift": 1.0}),
                SamplingParams(prompt="a much longer prompt about a blue dog", height=32, width=48, seed=2,
                               num_inference_steps=4, extra={"timestep_shift": 1.0})]
    after_first, worst, rows = None, 0.0, []
    for n, params in enumerate(requests):
        ours, ref = compiled.prepare(compiled.resolve(params), f"c{n}"), pipe.prepare(pipe.resolve(params), f"e{n}")
        for _ in range(3):
            v, w = compiled.denoise_step([ours])[0], pipe.denoise_step([ref])[0]
            worst = max(worst, (v - w).abs().max().item())
            rows.append(len(compiled._needed(ours)))
            compiled.scheduler_step([ours], [v])
            pipe.scheduler_step([ref], [w])
            if after_first is None:
                after_first = graphs()
                assert after_first[0] >= 2  # both regions went through dynamo
            assert graphs() == after_first
        assert (ours.latents - ref.latents).abs().max().item() <= 1e-5
    assert rows == [2, 2, 1, 2, 2, 1]
    assert worst <= 1e-5, worst


def test_benchmark_smoke(ckpt, capsys, bench_bagel_dit):
    """benchmarks/bench_bagel_dit.py at tiny size: the batched latents (attention_mode auto, and forced
    to varlen) agree with the per-branch ones, the reference runs, the table comes last. (The compiled
    variant and --attention are left out: their first compiles cost tens of seconds on this CPU; the
    compile test above covers the former.)"""
    variants = ["per-branch", "batched", "batched-varlen"]
    results = bench_bagel_dit(["--ckpt", str(ckpt), "--runs", "32:3x2", "--variants", *variants,
                               "--reference-steps", "1"])
    assert [(r["size"], r["concurrent"]) for r in results["runs"]] == [(32, 2)]
    for row in results["runs"]:
        for variant in variants[1:]:
            assert row[variant]["max_abs_latents_vs_first"] <= 1e-5 and row[variant]["s_per_step"] > 0
    assert results["reference"]["s_per_step"] > 0
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-2].startswith("| 32^2, 3 steps, 2 concurrent") and table[-1].startswith("| reference")


def test_x0_estimate_is_the_euler_step_to_zero_and_partials_stream(pipe):
    """Streaming partial images: BAGEL's x0 = x_t - t v, the Euler step x - v (t_i - t_{i+1}) taken
    to t = 0. At the last step (t_{i+1} = 0) it is the final latent bit for bit; before, it is where
    the step's velocity points at t = 0 (x_{i+1} + t_{i+1} v: the same line, checked to float32
    rounding). Through the engine: partial_images=2 with num_inference_steps=4 (4 flow times: 3 model
    evaluations, the engine's steps) decodes after steps 1 and 2; the final image == the unstreamed
    request's (batched with it)."""
    params = SamplingParams(prompt="a red cat", negative_prompt="blurry", height=32, width=32, seed=11,
                            num_inference_steps=5)
    (state,) = _states(pipe, {"a": params})
    sig = state.extras["sigmas"]
    assert sig[-1] == 0.0
    while not state.done:
        (v,) = pipe.denoise_step([state])
        x_t, i = state.latents.clone(), state.step_index
        x0 = pipe.x0_estimate(state, v)
        assert torch.equal(state.latents, x_t)  # the state is not touched
        pipe.scheduler_step([state], [v])
        if state.done:
            assert torch.equal(x0, state.latents)
        else:
            assert not torch.equal(x0, state.latents)
            torch.testing.assert_close(x0, state.latents - v * sig[i + 1], rtol=0, atol=1e-5)
    # its decode is the final decode's pixels
    final = pipe.decode(state).images[0]
    (partial_of_final,) = pipe.decode_partial(state.latents, state.params)
    assert np.array_equal(np.asarray(partial_of_final), np.asarray(final))

    streamed = dataclasses.replace(params, num_inference_steps=4, partial_images=2)
    engine = DiffusionEngine(pipe)
    events = []
    engine.add_request("s", streamed)
    engine.add_request("u", dataclasses.replace(streamed, partial_images=0))
    final_events = engine.run(on_event=events.append)
    partials = [e for e in events if e.kind == "partial"]
    assert [(e.request_id, e.index, e.step, e.total) for e in partials] == [("s", 0, 1, 3), ("s", 1, 2, 3)]
    assert all(e.output.images[0].size == (32, 32) for e in partials)
    s_img, u_img = (np.asarray(final_events[r].output.images[0]) for r in ("s", "u"))
    assert np.array_equal(s_img, u_img)
    assert not np.array_equal(np.asarray(partials[-1].output.images[0]), s_img)
