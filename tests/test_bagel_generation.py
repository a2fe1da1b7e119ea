"""BAGEL diffusion stage (vllm_omni_plugin.families.bagel.pipeline) on the tiny checkpoint.

Oracle: tests/reference/bagel_generation.py, an independent full-sequence MoT
(no KV cache, context recomputed each step, diffusers' VAE, transformers' ViT).

Tolerance (decoded uint8 pixels): at most 1 level, on under 1% of the values.
Both sides compute in float32, but in different orders (cached context KV vs a
full masked sequence, gathered vs selected experts, SDPA vs explicit softmax,
our FLUX AE vs diffusers' AutoencoderKL), so floats differ by ~1e-6 relative;
BAGEL's conversion truncates (x * 255 -> uint8), so a value sitting next to an
integer can land one level apart. Measured: 1 level on 0.01-0.02% of values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference.bagel_generation import BagelReference
from vllm_omni_plugin.diffusion import DiffusionEngine, SamplingParams
from vllm_omni_plugin.families.bagel.dit import encode_context
from vllm_omni_plugin.diffusion.handover import StageInputError
from vllm_omni_plugin.families.bagel.dit.weights import EMBED_TABLE
from vllm_omni_plugin.families.bagel.pipeline import BAGEL_DEFAULTS, BagelStepwise, load_bagel_pipeline

STEPS = 6  # flow times 1 .. 0 -> 5 evaluations
# With timestep_shift 1 the flow times are 1, .8, .6, .4, .2: CFG (interval (0.4, 1]) runs on the first
# three steps and is off on the last two, so both paths are compared. The img2img oracle keeps shift 3.


def _close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def _image(seed: int, size: tuple[int, int] = (56, 40)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("bagel")


@pytest.fixture(scope="module")
def pipe(ckpt):
    return load_bagel_pipeline(ckpt, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def ref(ckpt):
    return BagelReference(ckpt)


def _pixels(pipe, **kw) -> np.ndarray:
    return np.asarray(pipe.generate(SamplingParams(num_inference_steps=STEPS, **kw)).images[0])


def test_text2img_matches_reference(pipe, ref):
    ours = _pixels(pipe, prompt="a red cat", height=64, width=48, seed=1, extra={"timestep_shift": 1.0})
    _close(ours, ref.generate("a red cat", height=64, width=48, seed=1, steps=STEPS, timestep_shift=1.0))
    assert ours.std() > 20  # a real image, not a constant the comparison would pass trivially


@pytest.mark.parametrize("renorm", ["global", "text_channel"])
def test_img2img_matches_reference(pipe, ref, renorm):
    image = _image(0)  # 56x40 -> generated at 48x32, BAGEL's input-size rule floored to /16
    ours = pipe.generate(SamplingParams(prompt="make it blue", images=[image], num_inference_steps=STEPS, seed=2,
                                        extra={"cfg_renorm_type": renorm}))
    assert (ours.params.height, ours.params.width) == (32, 48)
    expected = ref.generate("make it blue", image=image, height=32, width=48, seed=2, steps=STEPS, cfg_renorm_type=renorm)
    _close(np.asarray(ours.images[0]), expected)
    # The oracle is discriminating: another input image or no image guidance moves many pixels.
    assert np.abs(ref.generate("make it blue", image=_image(1), height=32, width=48, seed=2, steps=STEPS,
                               cfg_renorm_type=renorm).astype(int) - expected).mean() > 2
    assert np.abs(ref.generate("make it blue", image=image, height=32, width=48, seed=2, steps=STEPS, cfg_img_scale=1.0,
                               cfg_renorm_type=renorm).astype(int) - expected).mean() > 2


def test_negative_prompt_companion_matches_reference(pipe, ref):
    ours = _pixels(pipe, prompt="a red cat", negative_prompt="blurry", height=32, width=32, seed=3)
    _close(ours, ref.generate("a red cat", negative_prompt="blurry", height=32, width=32, seed=3, steps=STEPS))


@pytest.mark.parametrize("mode", ["auto", "varlen"])
def test_batched_equals_single(pipe, mode):
    """Two requests (different prompt lengths -> padded, masked contexts; or packed for the varlen
    kernel) in one denoise step."""
    pipe.attention_mode = mode
    requests = {
        "a": SamplingParams(prompt="a red cat", height=32, width=48, num_inference_steps=STEPS, seed=4),
        "b": SamplingParams(prompt="a much longer prompt about a blue dog on a chair", height=32, width=48,
                            num_inference_steps=STEPS, seed=5),
    }
    alone = {rid: np.asarray(pipe.generate(p).images[0]) for rid, p in requests.items()}
    engine = DiffusionEngine(pipe)
    for rid, p in requests.items():
        engine.add_request(rid, p)
    final = engine.run()
    pipe.attention_mode = "auto"
    assert set(engine.stats.batch_sizes) == {2}  # every step ran both requests in one forward
    for rid in requests:
        assert final[rid].kind == "finished"
        # Padded batch rows change BLAS reduction splits (they also vary with the threads a loaded
        # machine gives): one uint8 level on a value or two was seen, so the stated tolerance applies.
        _close(np.asarray(final[rid].output.images[0]), alone[rid])


def test_handed_over_context_is_keyed_by_request(pipe):
    """A context handed over with request X serves request X only (what the AR hand-over does)."""
    params = SamplingParams(prompt="a red cat", height=32, width=32, num_inference_steps=STEPS, seed=6)
    other = SamplingParams(prompt="a green frog", height=32, width=32, num_inference_steps=STEPS, seed=6)
    resolved = pipe.resolve(params)
    ctx = encode_context(pipe.model, "req-frog", "a green frog", height=32, width=32)
    engine = DiffusionEngine(pipe)
    engine.add_request("req-cat", params)  # standalone DiT, no context: prefilled from its own prompt
    engine.add_request("req-frog", resolved, ctx)  # prompt says cat, the handed-over context says frog
    final = engine.run()
    # The two ran in one batched forward: padded rows change BLAS reduction splits, so the
    # batching tolerance of _close applies (one uint8 level on a few values; seen on this machine).
    cat, frog = np.asarray(final["req-cat"].output.images[0]), np.asarray(final["req-frog"].output.images[0])
    _close(cat, _pixels(pipe, prompt="a red cat", height=32, width=32, seed=6))
    _close(frog, np.asarray(pipe.generate(other).images[0]))
    assert np.abs(cat.astype(int) - frog.astype(int)).mean() > 5  # the frog context made another image
    # A context for another size is refused, not silently resized.
    engine.add_request("req-bad", resolved, encode_context(pipe.model, "req-bad", "x", height=48, width=32))
    assert engine.run()["req-bad"].kind == "error"


def test_stage_input_missing_or_mismatched_is_an_error_naming_stage_and_request(pipe):
    """Behind the AR stage a request without its context is refused, never re-encoded; another
    request's context or another type is refused too (diffusion/handover.py)."""
    staged = BagelStepwise(pipe.model, stage_input_required=True)  # as the orchestrator loads it
    engine = DiffusionEngine(staged)
    params = SamplingParams(prompt="a red cat", height=32, width=32, num_inference_steps=STEPS, seed=6)
    with pytest.raises(StageInputError, match=r"request req-1: the bagel diffusion stage needs a BagelContext"):
        engine.add_request("req-1", params)
    frog = encode_context(pipe.model, "req-frog", "a green frog", height=32, width=32)
    with pytest.raises(StageInputError, match=r"request req-2: .* was handed the BagelContext of request req-frog"):
        engine.add_request("req-2", params, frog)
    with pytest.raises(StageInputError, match=r"request req-3: .* takes a BagelContext, got a str"):
        engine.add_request("req-3", params, "not a context")
    assert not engine.has_unfinished()  # nothing refused was queued
    with pytest.raises(StageInputError, match="req-4"):  # nor can a direct prepare skip the input
        staged.prepare(staged.resolve(params), "req-4")
    # The request with its own context runs as the standalone one does.
    engine.add_request("req-frog", params, frog)
    out = np.asarray(engine.run()["req-frog"].output.images[0])
    _close(out, np.asarray(pipe.generate(SamplingParams(prompt="a green frog", height=32, width=32,
                                                        num_inference_steps=STEPS, seed=6)).images[0]))


def test_dit_stage_behind_the_ar_stage_loads_only_its_forward_weights(ckpt, pipe):
    """Each weight once: the DiT stage the orchestrator loads holds no LM head, ViT, connector,
    FLUX encoder or embedding table (two marker rows), and makes the same images from the same
    handed-over contexts as the DiT that loaded everything."""
    staged = load_bagel_pipeline(ckpt, dtype=torch.float32, device="cpu", stage_input_required=True)
    held, whole = set(staged.model.w), set(pipe.model.w)
    assert held < whole and set(staged.model.ae) < set(pipe.model.ae)
    dropped = whole - held
    assert {"language_model.lm_head.weight", EMBED_TABLE} <= dropped
    assert any(k.startswith("vit_model.") for k in dropped) and any(k.startswith("connector.") for k in dropped)
    assert not any(k.startswith("encoder.") for k in staged.model.ae)
    assert {k for k in whole if k.startswith("language_model.model.layers.")} <= held  # both experts' layers
    image = _image(0)
    requests = {
        "t2i": (SamplingParams(prompt="a red cat", height=32, width=32, num_inference_steps=STEPS, seed=7),
                encode_context(pipe.model, "t2i", "a red cat", height=32, width=32)),
        "i2i": (SamplingParams(prompt="make it blue", images=[image], num_inference_steps=STEPS, seed=8),
                encode_context(pipe.model, "i2i", "make it blue", image=image, height=32, width=48)),
    }
    for rid, (params, ctx) in requests.items():
        outs = []
        for p in (pipe, staged):
            engine = DiffusionEngine(p)
            engine.add_request(rid, params, ctx)
            outs.append(np.asarray(engine.run()[rid].output.images[0]))
        assert np.array_equal(outs[0], outs[1]), rid
        assert outs[0].std() > 20


def test_cfg_companions_and_positions(pipe):
    m = pipe.model
    prompt_len = len(m.tokenizer("a red cat", add_special_tokens=False)["input_ids"]) + 2  # + <|im_start|> <|im_end|>
    t2i = encode_context(m, "t", "a red cat", height=32, width=32)
    assert t2i.cfg_img is None and not t2i.is_img2img
    assert (t2i.cond.num_tokens, t2i.cond.latent_position) == (prompt_len, prompt_len)
    assert (t2i.cfg_text.num_tokens, t2i.cfg_text.latent_position) == (0, 0)  # BAGEL: the empty context
    assert t2i.cond.keys[0].shape == (prompt_len, m.config.kv_heads, m.config.head_dim)

    i2i = encode_context(m, "i", "a red cat", image=_image(0), height=32, width=48)
    vae_block = (32 // 16) * (48 // 16) + 2
    vit_block = m.config.vit_per_side**2 + 2
    # VAE block at position 0, ViT block at 1, text from 2; latents after the text.
    assert (i2i.cond.num_tokens, i2i.cond.latent_position) == (vae_block + vit_block + prompt_len, 2 + prompt_len)
    assert (i2i.cfg_text.num_tokens, i2i.cfg_text.latent_position) == (vae_block + vit_block, 2)
    assert (i2i.cfg_img.num_tokens, i2i.cfg_img.latent_position) == (prompt_len, prompt_len)
    # The image-only prefix of cond is exactly the cfg_text context (same prefill).
    torch.testing.assert_close(i2i.cond.keys[1][: vae_block + vit_block], i2i.cfg_text.keys[1], rtol=0, atol=0)


def test_defaults_resolve(pipe, ckpt):
    before = dict(BAGEL_DEFAULTS)
    t2i = pipe.resolve(SamplingParams(prompt="x"))
    assert t2i.num_inference_steps == 50
    assert t2i.extra == {"timestep_shift": 3.0, "cfg_text_scale": 4.0, "cfg_img_scale": None,
                         "cfg_interval": (0.4, 1.0), "cfg_renorm_type": "global", "cfg_renorm_min": 0.0}
    side = 8 * 16  # tiny max_latent_size * latent downsample (1024 for the real checkpoint)
    assert (t2i.height, t2i.width) == (side, side)
    i2i = pipe.resolve(SamplingParams(prompt="x", images=[_image(0, (100, 60))]))
    assert i2i.extra["cfg_img_scale"] == 1.5
    assert (i2i.height, i2i.width) == (48, 96)  # 60x100 fits the table after scaling by 128/100, floored to /16
    # request > stage config > pipeline default; `extra` carries BAGEL's knobs.
    stage = {"cfg_text_scale": 2.0, "num_inference_steps": 30, "cfg_interval": [0.0, 1.0]}
    r = pipe.resolve(SamplingParams(prompt="x", extra={"cfg_text_scale": 5.0}), stage)
    assert (r.extra["cfg_text_scale"], r.num_inference_steps, r.extra["cfg_interval"]) == (5.0, 30, (0.0, 1.0))
    assert dict(BAGEL_DEFAULTS) == before  # shared defaults untouched
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        pipe.resolve(SamplingParams(prompt="x", extra={"cfg_renorm_type": "bogus"}))
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.resolve(SamplingParams(prompt="x", height=40, width=32))

    # CFG companions per step: only inside cfg_interval (0.4, 1.0]; outside, one forward.
    state = pipe.prepare(pipe.resolve(SamplingParams(prompt="x", height=16, width=16, num_inference_steps=STEPS, seed=0,
                                                           extra={"timestep_shift": 1.0})), "s")
    needed = []
    while not state.done:
        needed.append(pipe._needed(state))
        pipe.scheduler_step([state], pipe.denoise_step([state]))
    ts = [float(t) for t in state.timesteps]
    assert needed == [["cond", "cfg_text"] if 0.4 < t <= 1.0 else ["cond"] for t in ts]
    assert ["cond"] in needed and ["cond", "cfg_text"] in needed
