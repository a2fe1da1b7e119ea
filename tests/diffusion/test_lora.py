"""Per-request LoRA that batches: oracle = diffusers' own load_lora_weights + set_adapters (CPU, float32).

Each request of a mixed batch (adapter A, adapter B at 0.5, none) runs in the same
engine steps and equals the same request alone on the diffusers pipeline with its
adapter set: within 1 uint8 level (the batch's GEMM blocking and padded text move
floats by ~1e-6, as for any batched request; tests/diffusion/test_oracle.py). The
request without an adapter is bit-identical to the same batch run with no adapters.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from pixels import assert_pixels_close, seeded
from vllm_omni_plugin.checkpoints.lora import make_lora
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams, load_pipeline
from vllm_omni_plugin.diffusion.lora import LoraBusy, LoraError, LoraNotFound, LoraPolicy

KW = dict(negative_prompt="blurry", height=64, width=96, num_inference_steps=3, true_cfg_scale=4.0)
PROMPTS = {"a": "a red cat on a mat", "b": "a blue dog", "none": "a green tree"}


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    ckpt = checkpoint("qwen-image")
    ours = load_pipeline(ckpt, dtype=torch.float32, device="cpu")
    root = tmp_path_factory.mktemp("loras")
    paths = {
        # rank 4, alpha 8 in the file's metadata: scaling 2
        "a": make_lora(ours.pipe, root / "a", rank=4, alpha=8, seed=1, magnitude=0.1),
        # another rank and more targets, saved without metadata (diffusers infers alpha = r)
        "b": make_lora(ours.pipe, root / "b", rank=2, seed=2, metadata=False, magnitude=0.2,
                       targets=("to_q", "to_v", "add_k_proj", "img_mlp.net.2")),
    }
    loras = ours.enable_lora(LoraPolicy(allowed_dirs=(str(root),), max_loras=2))
    for name, path in paths.items():
        loras.register(name, str(path))
    return ours, ckpt, root, paths


@pytest.fixture(scope="module")
def reference(setup):
    """The diffusers pipeline itself with both adapters loaded through load_lora_weights."""
    _, ckpt, _, paths = setup
    ref = DiffusionPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    for name, path in paths.items():
        ref.load_lora_weights(str(path), adapter_name=name)

    def run(prompt, seed, names=(), weights=()):
        if names:
            ref.enable_lora()
            ref.set_adapters(list(names), list(weights))
        else:
            ref.disable_lora()
        return ref(prompt, **KW, generator=seeded(seed), output_type="np").images

    return run


def _req(key, seed, lora=None):
    return SamplingParams(prompt=PROMPTS[key], **KW, seed=seed, output_type="np", lora=lora)


def test_mixed_adapters_batch_and_match_diffusers(setup, reference):
    ours, *_ = setup
    lora = {"a": (("a", 1.0),), "b": (("b", 0.5),), "none": None}
    engine = DiffusionEngine(ours)
    for i, key in enumerate(lora):
        engine.add_request(key, _req(key, 10 + i, lora[key]))
    final = engine.run()
    assert engine.stats.batch_sizes == [3] * KW["num_inference_steps"]  # 3 requests in every step
    ref = {key: reference(PROMPTS[key], 10 + i, *([[n for n, _ in v], [w for _, w in v]] if v else []))
           for i, (key, v) in enumerate(lora.items())}
    for key in lora:
        assert final[key].kind == "finished", final[key].error
        assert final[key].output.params.lora == lora[key]
        assert_pixels_close(np.stack(final[key].output.images), ref[key], 1)
    # the adapters do change the image, by far more than the tolerance (else the oracle proves nothing)
    for i, key in enumerate(("a", "b")):
        assert np.abs(reference(PROMPTS[key], 10 + i) - ref[key]).max() > 5 / 255
    # the request without an adapter: bit-identical to the same batch without any adapter
    base = DiffusionEngine(ours)
    for i, key in enumerate(lora):
        base.add_request(key, _req(key, 10 + i))
    assert np.array_equal(np.stack(base.run()["none"].output.images), np.stack(final["none"].output.images))


def test_a_kohya_layout_is_read_through_diffusers_converter(setup):
    """A ComfyUI / kohya-style file (diffusion_model. prefix, lora_down / lora_up, per-layer alpha): read by
    the pipeline class's own lora_state_dict, which converts it; the result equals diffusers' load_lora_weights."""
    from safetensors.torch import load_file, save_file

    ours, ckpt, root, paths = setup
    kohya = {}
    for key, value in load_file(paths["a"]).items():
        layer = key.removeprefix("transformer.").replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        kind = "lora_down" if ".lora_A." in key else "lora_up"
        kohya[f"diffusion_model.{layer}.{kind}.weight"] = value
        kohya[f"diffusion_model.{layer}.alpha"] = torch.tensor(8.0)  # adapter a: rank 4, alpha 8
    path = root / "kohya.safetensors"
    save_file(kohya, path)
    ours.loras.register("kohya", str(path))
    try:
        out = ours.generate(_req("a", 6, (("kohya", 0.8),)))
        same = ours.generate(_req("a", 6, (("a", 0.8),)))
    finally:
        ours.loras.unregister("kohya")
    ref = DiffusionPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    ref.load_lora_weights(str(path), adapter_name="kohya")
    ref.set_adapters(["kohya"], [0.8])
    expected = ref(PROMPTS["a"], **KW, generator=seeded(6), output_type="np").images
    assert_pixels_close(np.stack(out.images), expected, 1)
    assert_pixels_close(np.stack(out.images), np.stack(same.images), 1)  # the same adapter in another layout


def test_two_adapters_on_one_request(setup, reference):
    ours, *_ = setup
    out = ours.generate(_req("a", 5, (("a", 0.7), ("b", 1.5))))
    assert_pixels_close(np.stack(out.images), reference(PROMPTS["a"], 5, ["a", "b"], [0.7, 1.5]), 1)


def test_unknown_adapter_and_lora_without_enable(setup, pipeline):
    ours, *_ = setup
    with pytest.raises(LoraNotFound, match="unknown LoRA adapter 'nope'"):
        ours.resolve(_req("a", 1, (("nope", 1.0),)))
    with pytest.raises(LoraError, match="serves no LoRA") as err:
        pipeline("flux").resolve(SamplingParams(prompt="x", lora=(("a", 1.0),)))
    assert err.value.field == "lora"


def test_paths_refused_before_reading(setup, tmp_path):
    ours, _, root, paths = setup
    loras = ours.loras
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(paths["a"].read_bytes())
    with pytest.raises(LoraError, match="outside the directories allowed"):
        loras.register("out", str(outside))
    link = root / "link.safetensors"
    os.symlink(outside, link)
    with pytest.raises(LoraError, match="a symlink there leads out"):
        loras.register("link", str(link))
    text = root / "a.bin"
    text.write_bytes(b"\0" * 16)
    with pytest.raises(LoraError, match="not a .safetensors file"):
        loras.register("bin", str(text))
    small = type(loras)(ours.pipe, LoraPolicy(allowed_dirs=(str(root),), max_bytes=100))
    try:
        with pytest.raises(LoraError, match="over the limit of 100 bytes"):
            small.register("big", str(paths["a"]))
    finally:
        small.close()
    assert set(loras.names()) == {"a", "b"}


def test_adapter_that_does_not_fit(setup, checkpoint, tmp_path_factory):
    ours, _, root, _ = setup
    # an adapter trained on another Qwen-Image geometry (other widths): refused, naming the layer
    other = load_pipeline(checkpoint("flux"), dtype=torch.float32, device="cpu")
    path = make_lora(other.pipe, root / "flux", rank=2, seed=3)
    with pytest.raises(LoraError, match="(does not have|do not fit)"):
        ours.loras.register("foreign", str(path))
    assert "foreign" not in ours.loras.names()


def test_lru_eviction_reload_and_unload_in_use(setup, reference):
    ours, _, root, _ = setup
    loras = ours.loras  # max_loras=2, a and b registered
    path_c = make_lora(ours.pipe, root / "c", rank=3, seed=4)
    engine = DiffusionEngine(ours)
    engine.add_request("uses-a", _req("a", 3, (("a", 1.0),)))
    loras.register("c", str(path_c))  # evicts b (a is pinned by the queued request)
    assert loras.resident() == ["a", "c"]
    with pytest.raises(LoraBusy, match="in use by 1"):
        loras.unregister("a")  # refused while a queued / running request uses it
    engine.add_request("uses-b", _req("b", 4, (("b", 0.5),)))  # b reloads from its path, evicting c
    assert loras.resident() == ["a", "b"]
    with pytest.raises(LoraBusy, match="slots"):
        engine.add_request("uses-c", _req("a", 5, (("c", 1.0),)))  # both slots pinned
    final = engine.run()
    assert_pixels_close(np.stack(final["uses-b"].output.images), reference(PROMPTS["b"], 4, ["b"], [0.5]), 1)
    loras.unregister("c")
    assert "c" not in loras.names()


OTHERS = {
    "flux": (dict(height=64, width=96, num_inference_steps=3, max_sequence_length=32), "images"),
    # both experts take their steps; diffusers' load_lora_weights (and so the served adapter) targets the
    # high-noise expert `transformer` only (load_into_transformer_2 is not used)
    "wan2.2-t2v": (dict(negative_prompt="static", height=32, width=48, num_frames=5, num_inference_steps=4,
                        guidance_scale=4.0, guidance_scale_2=2.0), "frames"),
}


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_mixed_adapters_match_diffusers_on_other_families(family, checkpoint, tmp_path):
    kw, field = OTHERS[family]
    ckpt = checkpoint(family)
    ours = load_pipeline(ckpt, dtype=torch.float32, device="cpu")
    paths = {"a": make_lora(ours.pipe, tmp_path / "a", rank=4, alpha=8, seed=1, magnitude=0.1),
             "b": make_lora(ours.pipe, tmp_path / "b", rank=2, seed=2, magnitude=0.2)}
    loras = ours.enable_lora(LoraPolicy(allowed_dirs=(str(tmp_path),)))
    for name, path in paths.items():
        loras.register(name, str(path))
    lora = {"a": (("a", 1.0),), "b": (("b", 0.5),), "none": None}
    engine = DiffusionEngine(ours)
    for i, key in enumerate(lora):
        engine.add_request(key, SamplingParams(prompt=PROMPTS[key], **kw, seed=20 + i, output_type="np",
                                               lora=lora[key]))
    final = engine.run()
    assert engine.stats.batch_sizes == [3] * kw["num_inference_steps"]
    ref = DiffusionPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    for name, path in paths.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    for i, (key, v) in enumerate(lora.items()):
        if v:
            ref.enable_lora()
            ref.set_adapters([n for n, _ in v], [w for _, w in v])
        else:
            ref.disable_lora()
        expected = getattr(ref(PROMPTS[key], **kw, generator=seeded(20 + i), output_type="np"), field)
        out = final[key].output
        got = np.stack(out.images) if field == "images" else np.asarray(out.videos)
        assert_pixels_close(got, expected, 1)
        if v:
            ref.disable_lora()
            plain = getattr(ref(PROMPTS[key], **kw, generator=seeded(20 + i), output_type="np"), field)
            assert np.abs(plain - expected).max() > 5 / 255  # the adapter does change the output
