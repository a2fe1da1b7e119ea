"""Multi-GPU DiT on CPU: 2 gloo ranks (spawned processes) against one process.

CFG-parallel runs each forward of the one-process engine with `batch_cfg=False`
(all cond rows in one forward, all uncond rows in another) on the rank that owns
it, so the results are equal bit for bit. Ulysses sequence parallelism (diffusers'
context parallelism) splits attention over heads: float32 sums in another order,
~3e-6 here; the test allows 1e-4. Ring attention needs an LSE-returning CUDA
kernel and is refused on CPU.
"""

from __future__ import annotations

import pytest
import torch

from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams, load_pipeline
from vllm_omni_plugin.diffusion.acceleration import DitOptions
from vllm_omni_plugin.diffusion.parallel import ParallelConfig
from vllm_omni_plugin.diffusion.workers import PipelineBuilder, launch_engine


def req(prompt, seed, negative="blurry", **kw):
    return SamplingParams(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, height=64, width=96,
                          num_inference_steps=3, seed=seed, output_type="latent", **kw)


REQUESTS = {
    "cfg": req("a red cat", 1),
    "cfg-long": req("a much longer prompt about a blue dog on a beach", 2),
    "no-cfg": req("a third request", 3, negative=None),
    "cached": req("a cached one", 4, cache_threshold=10.0),  # skips steps 2.. (tiny random weights)
}


def run(engine):
    for rid, p in REQUESTS.items():
        engine.add_request(rid, p)
    final = engine.run()
    assert all(e.kind == "finished" for e in final.values()), {k: repr(e.error) for k, e in final.items()}
    return {rid: final[rid].output.latents for rid in REQUESTS}, list(engine.stats.batch_sizes)


@pytest.fixture(scope="module")
def one_process(checkpoint):
    pipe = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu", batch_cfg=False)
    return run(DiffusionEngine(pipe))


def launch(checkpoint, compile=None, **degrees):
    build = PipelineBuilder(str(checkpoint("qwen-image")), torch.float32, {"batch_cfg": False})
    return launch_engine(build, device="cpu", options=DitOptions(parallel=ParallelConfig(**degrees), compile=compile))


def max_errors_against_one_process(checkpoint, one_process, before_run=None, **launch_kw):
    """Run REQUESTS on a multi-rank engine; per request, max |latent difference| to the one-process run.
    `before_run(pipeline)`: called with rank 0's pipeline (this process) before the first request."""
    engine = launch(checkpoint, **launch_kw)
    try:
        assert engine.pipeline.parallel.cfg_rank == 0
        if before_run is not None:
            before_run(engine.pipeline)
        latents, batches = run(engine)
    finally:
        engine.close()
    reference, reference_batches = one_process
    assert batches == reference_batches == [4, 4, 4]  # concurrent requests still share every step
    return {rid: (latents[rid] - reference[rid]).abs().max().item() for rid in REQUESTS}


def test_cfg_parallel_two_ranks_equals_one_process_bit_for_bit(checkpoint, one_process):
    errors = max_errors_against_one_process(checkpoint, one_process, cfg_degree=2)
    assert all(e == 0 for e in errors.values()), errors


@pytest.mark.parametrize("compile", [None, "regional"])
def test_ulysses_two_ranks_matches_one_process(checkpoint, one_process, compile):
    """Eager and with regionally compiled blocks: diffusers' Ulysses attention hands a process group
    to a collective dynamo can neither trace nor fake, so under SP the attention stays eager (the
    first compiled request failed on 2x H200 before).

    Compiled: probes on rank 0 show that dynamo really traced the blocks (a hook on each block's MLP ran
    while compiling) and never the attention (a hook on its q projection, called inside the attention's
    forward, never ran while compiling), and that the compiled graphs exist (dynamo's counters)."""
    seen: dict[str, set[bool]] = {"mlp": set(), "attn": set()}

    def probe(pipeline):
        from vllm_omni_plugin.diffusion.acceleration import _attention_modules

        torch._dynamo.utils.counters.clear()
        dit = pipeline.pipe.transformer
        attention = _attention_modules(dit)
        assert attention and all(getattr(m.forward, "_torchdynamo_disable", False) == (compile is not None)
                                 for m in attention)
        for block in dit.transformer_blocks:
            block.img_mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].add(torch.compiler.is_compiling()))
            block.attn.to_q.register_forward_pre_hook(lambda m, a: seen["attn"].add(torch.compiler.is_compiling()))

    errors = max_errors_against_one_process(checkpoint, one_process, before_run=probe, compile=compile,
                                            ulysses_degree=2)
    assert all(e < 1e-4 for e in errors.values()), errors
    assert seen["attn"] == {False}  # attention eager, compiled or not
    if compile is None:
        assert seen["mlp"] == {False}
    else:
        assert True in seen["mlp"] and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def _twin_group_rank(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from vllm_omni_plugin.diffusion.parallel import ParallelGroup
    from vllm_omni_plugin.diffusion.workers import init_rank

    init_rank(rank, world, port, torch.device("cpu"))
    try:
        group = ParallelGroup(ParallelConfig(cfg_degree=2, ulysses_degree=2), torch.device("cpu"), torch.float32)
        twin = group._gloo_cfg_group()
        # the two CFG ranks' blocks differ in text length (cond prompt vs negative) and in number
        text = 7 if group.cfg_rank == 0 else 3
        counts = [2, 1]
        local = [torch.full((1, text + 16, 4), float(rank)), torch.full((2, text, 4), rank + 0.5)][:counts[group.cfg_rank]]
        via_mesh = group.gather_blocks(local, counts)
        group.cfg_object_group = twin
        via_twin = group.gather_blocks(local, counts)
        out.put((rank, dist.get_process_group_ranks(twin), dist.get_process_group_ranks(group.cfg_group),
                 [[t.tolist() for t in per] for per in via_mesh], [[t.tolist() for t in per] for per in via_twin]))
    finally:
        dist.destroy_process_group()


def test_gloo_twin_cfg_group_matches_the_mesh_cfg_group():
    """ParallelGroup._gloo_cfg_group (the host-side shape exchange's group when the mesh is NCCL) on 4 gloo
    ranks (cfg 2 x ulysses 2): each rank's twin holds the same ranks as its mesh CFG group, and the shape
    exchange over it gathers blocks of other text lengths and counts exactly as over the mesh group.
    Not runnable here: choosing the twin for a CUDA mesh, the NCCL payload gather beside it, and
    diffusers' Ulysses length exchange taking the gloo half of a `cpu:gloo,cuda:nccl` group."""
    import torch.multiprocessing as mp

    from vllm_omni_plugin.diffusion.workers import free_port

    ctx, world, port = mp.get_context("spawn"), 4, free_port()
    out = ctx.Queue()
    procs = [ctx.Process(target=_twin_group_rank, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, twin, cfg, via_mesh, via_twin = out.get(timeout=180)
        results[rank] = (twin, cfg, via_mesh, via_twin)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (twin, cfg, via_mesh, via_twin) in results.items():
        assert twin == cfg and rank in twin and len(twin) == 2, (rank, twin, cfg)
        assert via_twin == via_mesh
        other = [r for r in twin if r != rank][0]
        theirs = via_twin[1 - (twin.index(rank))]
        text = 7 if twin.index(other) == 0 else 3
        expected = [torch.full((1, text + 16, 4), float(other)), torch.full((2, text, 4), other + 0.5)]
        assert theirs == [t.tolist() for t in expected[:[2, 1][twin.index(other)]]]


def test_omni_with_cfg_parallel_matches_single_device(checkpoint):
    from vllm_omni_plugin import Omni

    model = str(checkpoint("qwen-image"))
    params = req("an omni request", 7)
    single = Omni(model=model, dtype="float32", device="cpu").generate(params)[0].latents
    omni = Omni(model=model, dtype="float32", device="cpu", parallel={"cfg_degree": 2})
    try:
        parallel = omni.generate(params)[0].latents
    finally:
        omni.shutdown()
    # single device runs cond+uncond in one forward (batch_cfg): float rounding only
    assert (parallel - single).abs().max().item() < 1e-4


def test_parallel_config_validation():
    assert ParallelConfig(cfg_degree=2, ulysses_degree=2).world_size == 4
    assert not ParallelConfig().enabled
    assert ParallelConfig(cfg_degree=3).world_size == 3  # batch split beyond the two CFG branches
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(cfg_degree=0)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(ulysses_degree=0)
    with pytest.raises(ValueError, match="unknown parallel setting"):
        ParallelConfig.from_dict({"cfg_degre": 2})
    with pytest.raises(ValueError, match="compile must be one of"):
        DitOptions.from_dict({"compile": "max"})
    with pytest.raises(ValueError, match="quantization must be one of"):
        DitOptions.from_dict({"quantization": "int4"})


def test_wan_cfg_parallel_equals_one_process(checkpoint):
    """Wan2.2 (two experts, per-step CFG scale): two concurrent requests over 2 CFG ranks."""
    def wan(seed):
        return SamplingParams(prompt="a dog runs", negative_prompt="static", height=32, width=32, num_frames=5,
                              num_inference_steps=4, seed=seed, output_type="latent")

    path = str(checkpoint("wan2.2-t2v"))
    one = DiffusionEngine(load_pipeline(path, dtype=torch.float32, device="cpu", batch_cfg=False))
    engine = launch_engine(PipelineBuilder(path, torch.float32, {"batch_cfg": False}), device="cpu",
                           options=DitOptions(parallel=ParallelConfig(cfg_degree=2)))
    try:
        results = []
        for e in (one, engine):
            for seed in (1, 2):
                e.add_request(f"w{seed}", wan(seed))
            results.append(e.run())
    finally:
        engine.close()
    for seed in (1, 2):
        assert torch.equal(results[0][f"w{seed}"].output.latents, results[1][f"w{seed}"].output.latents)



def test_batch_split_places_requests_once_by_load(pipeline):
    """cfg_split: 2 ranks = cond on 0, uncond on 1 (the batch_cfg=False forwards); more ranks also deal
    out requests by load; a request keeps its ranks for its life (its step cache lives there)."""
    pipe = pipeline("qwen-image")
    assert pipe.parallel is None
    states = {rid: pipe.prepare(pipe.resolve(p), rid) for rid, p in REQUESTS.items()}
    cost = {rid: s.tokens_per_row * s.rows for rid, s in states.items()}
    assert cost["cfg"] < cost["cfg-long"] < cost["cached"] + cost["no-cfg"]  # prompt lengths decide

    def split(ids, ranks):
        live = [states[i] for i in ids]
        blocks = [(s, b) for s in live for b in range(s.cfg.branches)]
        owned = pipe.cfg_split(live, blocks, ranks)
        assert sorted((id(s), b) for r in owned for s, b in r) == sorted((id(s), b) for s, b in blocks)
        return {r: [(s.request_id, b) for s, b in blocks_r] for r, blocks_r in enumerate(owned)}

    assert split(["cfg", "no-cfg", "cfg-long"], 2) == {0: [("cfg", 0), ("no-cfg", 0), ("cfg-long", 0)],
                                                         1: [("cfg", 1), ("cfg-long", 1)]}
    for s in states.values():
        s.extras.clear()
    three = split(["cfg", "cfg-long", "cached", "no-cfg"], 3)
    # cfg -> (0, 1); cfg-long -> rank 2 and the lower of the tied 0 / 1; cached -> the two least
    # loaded (1, 2); no-cfg -> rank 1, the least loaded after that
    assert three == {0: [("cfg", 0), ("cfg-long", 0)],
                     1: [("cfg", 1), ("cached", 0), ("no-cfg", 0)],
                     2: [("cfg-long", 1), ("cached", 1)]}, (three, cost)
    # "cfg" finished: the others keep their ranks; a newcomer goes where the load is least
    states["late"] = pipe.prepare(pipe.resolve(req("a late one", 9, negative=None)), "late")
    after = split(["cfg-long", "cached", "no-cfg", "late"], 3)
    assert after == {0: [("cfg-long", 0), ("late", 0)], 1: [("cached", 0), ("no-cfg", 0)],
                     2: [("cfg-long", 1), ("cached", 1)]}, (after, cost)


def test_batch_split_over_three_ranks_matches_one_process(checkpoint, one_process):
    """cfg_degree 3: requests and CFG branches dealt over three gloo ranks; every request's
    result equals the one-process engine's (row-wise float32 rounding allowed)."""
    errors = max_errors_against_one_process(checkpoint, one_process, cfg_degree=3)
    assert all(e < 1e-4 for e in errors.values()), errors


IMAGE_FAMILY_REQUESTS = {
    "qwen-image-layered": lambda i, image: SamplingParams(
        prompt=f"layers {i}", negative_prompt="blurry", true_cfg_scale=4.0, images=[image], layers=2,
        num_inference_steps=3, seed=i, output_type="latent"),
    "wan2.2-i2v": lambda i, image: SamplingParams(
        prompt=f"a dog {i}", negative_prompt="static", images=[image], height=32, width=32, num_frames=5,
        num_inference_steps=3, seed=i, output_type="latent"),
    "wan2.2-ti2v-5b": lambda i, image: SamplingParams(
        prompt=f"a cat {i}", negative_prompt="static", images=[image] if i else None, height=32, width=32,
        num_frames=5, num_inference_steps=3, seed=i, output_type="latent"),
}


@pytest.mark.parametrize("family", sorted(IMAGE_FAMILY_REQUESTS))
def test_image_conditioned_families_split_over_three_ranks(checkpoint, rgb_image, family):
    """Input-image families (their per-request image latents and encodings prepared on every rank):
    three concurrent requests over cfg_degree 3 == one process within float32 rounding."""
    path = str(checkpoint(family))
    one = DiffusionEngine(load_pipeline(path, dtype=torch.float32, device="cpu", batch_cfg=False))
    engine = launch_engine(PipelineBuilder(path, torch.float32, {"batch_cfg": False}), device="cpu",
                           options=DitOptions(parallel=ParallelConfig(cfg_degree=3)))
    results = []
    try:
        for e in (one, engine):
            for i in range(3):
                e.add_request(f"r{i}", IMAGE_FAMILY_REQUESTS[family](i, rgb_image))
            final = e.run()
            assert all(f.kind == "finished" for f in final.values()), {k: repr(f.error) for k, f in final.items()}
            results.append([final[f"r{i}"].output.latents for i in range(3)])
    finally:
        engine.close()
    errors = [(a - b).abs().max().item() for a, b in zip(*results)]
    assert max(errors) < 1e-4, errors
