"""BAGEL's DiT stage CFG-parallel (dit_options cfg_degree 2 / 3) over gloo ranks == one process.

CPU float32, tiny BAGEL, real spawned ranks (diffusion/workers.launch_engine, the machinery Qwen-Image's
CFG-parallel runs on). Oracle: the one-process engine on the same requests (its default: every branch
of a step in one batched forward). The ranks run other row groupings (cond alone on rank 0, the
companions on rank 1), so the sums round differently: final latents and decoded pixels (the VAE's
float output) within 1e-4. Concurrent requests of two sizes, text2img and img2img; contexts handed
over as the AR stage hands them (each worker rank is sent the KV of its own branches only, counted)
and one prefilled on every rank (no stage input).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams
from vllm_omni_plugin.diffusion.acceleration import DitOptions
from vllm_omni_plugin.diffusion.capabilities import InvalidParams
from vllm_omni_plugin.diffusion.parallel import ParallelConfig
from vllm_omni_plugin.diffusion.workers import launch_engine
from vllm_omni_plugin.families.bagel.dit.encode import encode_context
from vllm_omni_plugin.families.bagel.pipeline import load_bagel_pipeline

STEPS = 6  # shift 1: flow times 1, .8, .6, .4, .2 -> CFG on the first three steps: the companion ranks idle after


def _image(seed: int) -> Image.Image:  # 56x40 -> generated at 48x32
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 56, 3), dtype=np.uint8))


def _req(prompt, seed, **kw):
    return SamplingParams(prompt=prompt, seed=seed, num_inference_steps=STEPS, output_type="latent",
                          extra={"timestep_shift": 1.0}, **kw)


TEXT2IMG = {
    "t2i-a": _req("a red cat", 1, height=32, width=48),
    "t2i-b": _req("a much longer prompt about a blue dog", 2, negative_prompt="blurry", height=32, width=48),
    "t2i-c": _req("a tall lighthouse", 3, height=64, width=32),  # another size: its own steps
}
IMG2IMG = {
    "i2i-a": _req("make it blue", 4, images=[_image(0)]),
    "i2i-b": _req("make it a much greener picture", 5, images=[_image(1)], negative_prompt="dark"),
    "i2i-c": _req("make it red", 6, images=[_image(2)], height=32, width=32),  # another size
}
PREFILLED_ON_EACH_RANK = {"t2i-c"}  # no stage input: every rank prefills it (a standalone DiT)


@pytest.fixture(scope="module")
def pipe(checkpoint):  # the one-process oracle; the ranks load the same checkpoint (`ckpt`)
    return load_bagel_pipeline(checkpoint("bagel"), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def ckpt(pipe):
    return pipe.model.path


@pytest.fixture(scope="module")
def contexts(pipe):
    """Each request's BagelContext, prefilled once here as the AR stage hands it over."""
    out = {}
    for rid, p in {**TEXT2IMG, **IMG2IMG}.items():
        r = pipe.resolve(p)
        out[rid] = encode_context(pipe.model, rid, r.prompt, r.images[0] if r.images else None, r.negative_prompt,
                                  r.height, r.width)
    return out


def _run(engine, requests, contexts):
    for rid, p in requests.items():
        engine.add_request(rid, p, None if rid in PREFILLED_ON_EACH_RANK else contexts[rid])
    final = engine.run()
    assert all(e.kind == "finished" for e in final.values()), {k: repr(e.error) for k, e in final.items()}
    return {rid: final[rid].output.latents for rid in requests}


def _pixels(pipe, latents, params):
    r = pipe.resolve(params)
    with torch.no_grad():
        return pipe.vae.decode(pipe.model.unpatchify(latents, r.height, r.width))


def _kv_bytes(ctx, names):
    branches = ctx.branches()
    return sum(t.numel() * t.element_size() for n in names for t in (*branches[n].keys, *branches[n].values))


def _check(pipe, ckpt, contexts, degree, requests, rank_branches, before=None):
    one = _run(DiffusionEngine(pipe), requests, contexts)
    engine = launch_engine(functools.partial(load_bagel_pipeline, str(ckpt), torch.float32), device="cpu",
                           options=DitOptions(parallel=ParallelConfig(cfg_degree=degree)))
    try:
        if before is not None:
            before(engine)
        par = _run(engine, requests, contexts)
        sent = dict(engine.pipeline.parallel.sent_bytes)
        batches = list(engine.stats.batch_sizes)
    finally:
        engine.close()
    assert max(batches) >= 2  # concurrent requests of a size still share their steps
    for rid, p in requests.items():
        assert (par[rid] - one[rid]).abs().max().item() <= 1e-4, rid
        assert (_pixels(pipe, par[rid], p) - _pixels(pipe, one[rid], p)).abs().max().item() <= 1e-4, rid
    # each worker rank was sent the context KV of its own branches, nothing more (+ pickling's framing)
    handed = [rid for rid in requests if rid not in PREFILLED_ON_EACH_RANK]
    for rank, names in rank_branches.items():
        need = sum(_kv_bytes(contexts[rid], [n for n in names if n in contexts[rid].branches()]) for rid in handed)
        whole = sum(_kv_bytes(contexts[rid], list(contexts[rid].branches())) for rid in handed)
        assert need <= sent[rank] <= need + 64 * 1024, (rank, sent[rank], need)
        assert sent[rank] < whole
    assert set(sent) == set(rank_branches)


def test_cfg_parallel_two_ranks_equals_one_process(pipe, ckpt, contexts):
    """text2img (cond | cfg_text) and img2img (cond | cfg_text + cfg_img) over 2 ranks."""
    _check(pipe, ckpt, contexts, 2, {**TEXT2IMG, **IMG2IMG}, {1: ["cfg_text", "cfg_img"]})


def test_cfg_parallel_three_ranks_img2img_and_refusals(pipe, ckpt, contexts):
    """img2img, one branch per rank; requests with fewer branches than ranks are refused, naming the fix."""
    def refusals(engine):
        with pytest.raises(InvalidParams, match="over 3 ranks.*text2img request has 2 .*cond, cfg_text") as e:
            engine.add_request("t", TEXT2IMG["t2i-a"])
        assert e.value.field == "image"
        with pytest.raises(InvalidParams, match="has 1 .*cond") as e:
            engine.add_request("i", SamplingParams(prompt="x", images=[_image(0)], extra={"cfg_text_scale": 1.0}))
        assert e.value.field == "cfg_text_scale"

    _check(pipe, ckpt, contexts, 3, IMG2IMG, {1: ["cfg_text"], 2: ["cfg_img"]}, before=refusals)


def test_unusable_degrees_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="at most 3 CFG branches"):
        pipe.apply_dit_options(DitOptions(parallel=ParallelConfig(cfg_degree=4)))
    with pytest.raises(ValueError, match="sequence parallelism"):
        pipe.apply_dit_options(DitOptions(parallel=ParallelConfig(ulysses_degree=2)))


def test_benchmark_cfg_parallel_smoke(ckpt, capsys, bench_bagel_dit):
    """benchmarks/bench_bagel_dit.py's cfg-parallel variant at tiny size (img2img, 2 ranks; cfg-parallel-3
    is the same code with 3, left out for time): it runs, its latents agree with the one-process batched
    ones, the KV bytes the worker rank was sent are reported, the table comes last."""
    results = bench_bagel_dit(["--ckpt", str(ckpt), "--runs", "32:3x2", "--img2img", "--variants", "batched",
                               "cfg-parallel-2", "--reference-steps", "0"])
    (row,) = results["runs"]
    assert row["cfg-parallel-2"]["max_abs_latents_vs_first"] <= 1e-4 and row["cfg-parallel-2"]["s_per_step"] > 0
    assert set(results["kv_bytes_sent_per_rank"]["cfg-parallel-2"]) == {"1"}
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-1].startswith("| 32^2, 3 steps, 2 concurrent") and "cfg-parallel-2 s/step" in table[-3]
