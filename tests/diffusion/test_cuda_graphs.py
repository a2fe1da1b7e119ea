"""Whole-transformer CUDA graphs (dit_options `cuda_graphs`): everything but the capture itself.

The runner is the shipped `GraphedForward`; the one function these CPU tests change is its
`capture`: `cuda_graphs.replay_by_call`, whose replay runs the real forward on the same static
input buffers and writes the same static output tensors a CUDA-graph replay writes. Bucketing,
row padding, copy-in, clone-out, eviction and fallbacks are the code the GPU runs; that the
capture succeeds (and what it gains) is measured on the GPU only (benchmarks/README.md).
Oracles: the transformer's own forward and the engine without graphs, tiny Qwen-Image, float32.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers import transformer_qwenimage

from host_sync import HOST_DATA_OPS, SYNC_OPS, SyncRecorder
from vllm_omni_plugin.diffusion import DiffusionEngine, EngineConfig, SamplingParams, load_pipeline
from vllm_omni_plugin.diffusion import cuda_graphs
from vllm_omni_plugin.diffusion.acceleration import DitOptions, apply_dit_options, graph_dit
from vllm_omni_plugin.families.qwen_image import graphs as qwen_graphs
from vllm_omni_plugin.families.qwen_image.checkpoint import TRANSFORMER

IMG = (1, 4, 6)  # 24 image tokens


@pytest.fixture()
def transformer():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TRANSFORMER["tiny"]).eval()


def _inputs(rows: int, text: int = 9, seed: int = 0, mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(rows, 24, 64, generator=g),
              encoder_hidden_states=torch.randn(rows, text, 128, generator=g),
              timestep=torch.rand(rows, generator=g), img_shapes=[[IMG]] * rows, attention_kwargs={},
              return_dict=False)
    if mask:  # rows of different text lengths, padded and masked as the pipeline does
        m = torch.ones(rows, text, dtype=torch.long)
        m[0, text // 2:] = 0
        kw["encoder_hidden_states_mask"] = m
    return kw


def _plain(transformer, kw) -> torch.Tensor:
    with torch.no_grad():
        return type(transformer).forward(transformer, **kw)[0]


def _scale(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item())


def test_bucket_rows_are_powers_of_two():
    assert [cuda_graphs.padded_rows(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("rows,padded", [(1, 2), (3, 4), (5, 8), (6, 8)])
def test_padded_rows_leave_the_real_rows_unchanged(transformer, rows, padded, mask):
    """Rows padded with copies of row 0 (what GraphedForward does): the real rows' outputs equal the
    unpadded forward's within 1e-6 relative (measured: not bit for bit -- CPU GEMMs block M differently
    -- at most 6e-7 on outputs of magnitude ~2)."""
    kw = _inputs(rows, mask=mask)
    ref = _plain(transformer, kw)
    extra = [0] * (padded - rows)
    big = {k: (torch.cat([v, v[extra]]) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    big["img_shapes"] = [[IMG]] * padded
    out = _plain(transformer, big)[:rows]
    assert (out - ref).abs().max().item() <= 1e-6 * _scale(ref)


def test_interleaved_requests_of_one_bucket_get_their_own_results(transformer):
    """Request A, then request B of the same bucket (another replay writes the same static output):
    A's result is unchanged, because it was cloned out -- the bug that killed the regional CUDA graphs."""
    graphed = cuda_graphs.install(transformer, capture=cuda_graphs.replay_by_call)
    a, b = _inputs(3, seed=1), _inputs(3, seed=2)
    ref_a, ref_b = _plain(transformer, a), _plain(transformer, b)
    with torch.no_grad():
        transformer(**a)  # first use of the bucket: the plain forward
        out_a = transformer(**a)[0]  # captured, replayed
        out_b = transformer(**b)[0]  # replayed with B's inputs copied in
        again_a = transformer(**a)[0]
    assert graphed.stats.captured == 1 and graphed.stats.replays == 3
    assert graphed.stats.fallbacks == {"first use of a bucket": 1}
    static = next(iter(graphed.graphs.values())).outputs[0]
    # the static output now holds A's second replay: B's result was overwritten in place, so a
    # result handed out without the clone would have changed under its caller
    assert torch.equal(static[:3], again_a)
    for out, ref in ((out_a, ref_a), (out_b, ref_b), (again_a, ref_a)):
        assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-6 * _scale(ref)
    assert not torch.equal(out_a, out_b)
    # pad rows (4th) come from copies of real rows: finite
    assert torch.isfinite(static).all()


def test_buckets_key_on_rows_text_length_and_python_arguments(transformer):
    graphed = cuda_graphs.install(transformer, capture=cuda_graphs.replay_by_call)
    key = lambda kw: graphed._plan((), kw).key  # noqa: E731
    assert key(_inputs(3)) == key(_inputs(4, seed=5))  # 3 rows ride in the 4-row bucket
    assert key(_inputs(3)) != key(_inputs(5))
    assert key(_inputs(3, text=9)) != key(_inputs(3, text=10))  # text length is exact (no text padding)
    assert key(_inputs(3)) != key(_inputs(3, mask=True))
    other = _inputs(3)
    other["img_shapes"] = [[(1, 6, 4)]] * 3
    assert key(other) != key(_inputs(3))


def test_bound_evicts_the_least_recently_used_graph_and_counts_fallbacks(transformer):
    released: list[int] = []

    def capture(run):  # replay_by_call, recording each release
        outputs, replay, _ = cuda_graphs.replay_by_call(run)
        return outputs, replay, lambda: released.append(outputs[0].shape[0])

    graphed = cuda_graphs.install(transformer, max_graphs=2, capture=capture)
    with torch.no_grad():
        for rows in (1, 2, 4, 2):  # buckets 1, 2, 4: bucket 1 is evicted when 4 is captured; 2 stays
            for _ in range(2):
                out = transformer(**_inputs(rows, seed=rows))[0]
                assert out.shape[0] == rows
    assert released == [1]
    assert [k[0] for k in graphed.graphs] == [4, 2]
    assert graphed.stats.captured == 3 and graphed.stats.evicted == 1
    with torch.no_grad():
        plain = transformer(**{**_inputs(2), "return_dict": True}).sample  # return_dict: plain forward
        with cuda_graphs.off("step cache"):
            transformer(**_inputs(2))
    assert plain.shape[0] == 2
    assert graphed.stats.fallbacks["return_dict is not False"] == 1
    assert graphed.stats.fallbacks["step cache"] == 1
    assert cuda_graphs.stats([transformer])["evicted"] == 1
    cuda_graphs.uninstall(transformer)
    assert released == [1, 4, 2] and "forward" not in transformer.__dict__


def test_qwen_forward_reads_no_host_data_once_fixed(transformer, monkeypatch):
    """The masked forward builds one tensor from a python int (diffusers' compute_text_seq_len_from_mask):
    a blocking host-to-device copy on a GPU, refused by a capture. The replacement computes the same
    values from device ops; after it, the forward has neither host syncs nor host data."""
    original = transformer_qwenimage.compute_text_seq_len_from_mask
    monkeypatch.setattr(transformer_qwenimage, "compute_text_seq_len_from_mask", original)
    kw = _inputs(3, mask=True)
    with torch.no_grad():
        with SyncRecorder(SYNC_OPS + HOST_DATA_OPS) as rec:
            before = transformer(**kw)[0]
        assert rec.seen == ["aten.lift_fresh.default"]  # the recorder sees what it should
        qwen_graphs.install_text_length_fix()
        for mask in (True, False):
            inputs = _inputs(3, mask=mask)
            with SyncRecorder(SYNC_OPS + HOST_DATA_OPS) as rec:
                after = transformer(**inputs)[0]
            assert rec.seen == []
    assert torch.equal(before, _plain(transformer, kw))  # the same forward, bit for bit
    # the same three values as diffusers' function, for contiguous, holed and empty masks
    e = torch.zeros(4, 7, 2)
    masks = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0], [0] * 7, [1] * 7])
    for m in (masks, masks.bool(), None):
        ours, theirs = qwen_graphs._text_seq_len_from_mask(e, m), original(e, m)
        assert ours[0] == theirs[0]
        for x, y in zip(ours[1:], theirs[1:]):
            assert (x is None and y is None) or torch.equal(x, y)
    assert after.shape[0] == 3


def test_zero_cond_t_models_are_refused():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TRANSFORMER["tiny"], zero_cond_t=True)
    with pytest.raises(ValueError, match="zero_cond_t.*cannot capture"):
        qwen_graphs.check_capturable(model)


def req(seed, prompt, **kw):
    return SamplingParams(prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=96,
                          num_inference_steps=4, seed=seed, output_type="latent", **kw)


def _engine_latents(pipeline, requests) -> dict[str, torch.Tensor]:
    engine = DiffusionEngine(pipeline, EngineConfig(max_batch_tokens=1 << 20))
    for rid, p in requests.items():
        engine.add_request(rid, p)
    final = engine.run()
    return {rid: final[rid].output.latents for rid in requests}


def test_engine_with_graphs_equals_the_engine_without(checkpoint):
    """Three concurrent requests (texts of three lengths: padded + masked; 6 CFG rows in the 8-row bucket)
    through the engine: the same latents as without graphs; each step after the first replays."""
    plain = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")
    graphed = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")
    graph_dit(graphed, max_graphs=4, capture=cuda_graphs.replay_by_call)
    requests = {"a": req(1, "a red cat"), "b": req(2, "a much longer prompt about a blue dog on a chair"),
                "c": req(3, "tea")}
    ref, out = _engine_latents(plain, requests), _engine_latents(graphed, requests)
    for rid in requests:
        assert (out[rid] - ref[rid]).abs().max().item() <= 1e-5, rid
    stats = cuda_graphs.stats([graphed.pipe.transformer])
    assert stats["captured"] == 1 and stats["replays"] == 3, stats  # 4 steps: first use, then 3 replays
    # step caching switches graphs off for its forwards (its row plan is host data)
    cached = _engine_latents(graphed, {"a": req(1, "a red cat", cache_threshold=0.0)})
    assert cuda_graphs.stats([graphed.pipe.transformer])["fallbacks"]["step cache"] == 4
    assert torch.allclose(cached["a"], _engine_latents(plain, {"a": req(1, "a red cat")})["a"], atol=1e-5)


def test_cuda_graphs_option_is_refused_off_cuda_and_validated(checkpoint):
    pipeline = load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs needs the DiT on a CUDA GPU; it is on cpu"):
        apply_dit_options(pipeline, DitOptions(cuda_graphs=True))
    assert "forward" not in pipeline.pipe.transformer.__dict__  # refused before anything changed
    assert DitOptions.from_dict({"cuda_graphs": True, "cuda_graph_max": 3}) == DitOptions(cuda_graphs=True,
                                                                                           cuda_graph_max=3)
    for bad in ({"cuda_graphs": "yes"}, {"cuda_graph_max": 0}, {"cuda_graphs": True, "ulysses_degree": 2}):
        with pytest.raises(ValueError, match="cuda_graph"):
            DitOptions.from_dict(bad)


def test_benchmark_smoke(tmp_path):
    """bench_qwen_image.py's graphs part on CPU: diffusers one by one and our engine run; the CUDA-graph
    variant is skipped with its reason printed; the side-by-side table comes last."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_qwen_image.py"
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(bench), "--preset", "tiny", "--device", "cpu", "--modes", "eager",
                          "--parts", "graphs", "--graph-size", "64", "--graph-concurrency", "2", "--tp-steps", "2",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the CUDA-graph variant is skipped: CUDA graphs need a CUDA GPU (this run is on cpu)" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert {"eager:graphs:2:diffusers one-by-one", "eager:graphs:2:ours"} <= set(results)
    assert all(r["img_s"] > 0 for r in results.values())
    assert run.stdout.strip().splitlines()[-1].startswith("| eager: ours |")


def test_forwards_with_lora_rows_run_without_graphs(checkpoint, tmp_path):
    """A batch with an adapter row runs the plain forward (the adapters' row plan is host data, per
    forward, and a graph would replay the plan of its capture); the same requests equal the ungraphed run."""
    from vllm_omni_plugin.checkpoints.lora import make_lora
    from vllm_omni_plugin.diffusion.lora import LoraPolicy

    pipelines = [load_pipeline(checkpoint("qwen-image"), dtype=torch.float32, device="cpu") for _ in range(2)]
    path = make_lora(pipelines[0].pipe, tmp_path / "a", rank=4, alpha=8, seed=1, magnitude=0.1)
    for p in pipelines:
        p.enable_lora(LoraPolicy(allowed_dirs=(str(tmp_path),))).register("a", str(path))
    plain, graphed = pipelines
    graph_dit(graphed, max_graphs=2, capture=cuda_graphs.replay_by_call)
    requests = {"a": req(1, "a red cat", lora=[("a", 1.0)]), "b": req(2, "a blue dog")}
    ref, out = _engine_latents(plain, requests), _engine_latents(graphed, requests)
    for rid in requests:
        assert (out[rid] - ref[rid]).abs().max().item() <= 1e-5, rid
    stats = cuda_graphs.stats([graphed.pipe.transformer])
    assert stats["fallbacks"] == {"lora": 4} and stats["captured"] == 0, stats
    without = _engine_latents(graphed, {"b": req(2, "a blue dog")})  # no adapter row: graphs again
    assert cuda_graphs.stats([graphed.pipe.transformer])["replays"] == 3
    assert (without["b"] - _engine_latents(plain, {"b": req(2, "a blue dog")})["b"]).abs().max().item() <= 1e-5
