"""The BAGEL checkpoint factory, and plain vLLM serving it (text2text, img2text).

Oracles: the LLM part is compared token by token with transformers run on the
same weights; the checkpoint's weight names are compared with the parameters
of the model vLLM builds. img2text has no exact oracle yet (vLLM's CPU
attention is causal over the image tokens, BAGEL's is bidirectional), so its
test shows that the image conditions the answer and that answers repeat.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vllm_omni_plugin.families.bagel import checkpoint as bagel

IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe the image"
TEXT_PROMPT = "A red cat sitting on a blue chair"
# Weights vLLM skips: the MoT generation expert, the diffusion-side modules, the VAE.
GENERATION_KEYS = ("moe_gen", "latent_pos_embed", "time_embedder", "vae2llm", "llm2vae")


def _names(path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def _count(spec) -> int:
    return sum(math.prod(shape) for shape, _ in spec.values())


def _vllm_parameter_names(model) -> list[str]:
    """Runs inside the vLLM worker (LLM.apply_model)."""
    return sorted(name for name, _ in model.named_parameters())


def _greedy(params=None, n: int = 8):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=5, **(params or {}))


# ------------------------------------------------------------ checkpoint


def test_checkpoint_is_byte_deterministic_per_seed(checkpoint, tmp_path):
    ref = checkpoint("bagel")
    same, other = tmp_path / "same", tmp_path / "other"
    bagel.build(same, preset="tiny", seed=0)
    bagel.build(other, preset="tiny", seed=1)
    files = sorted(p.name for p in ref.iterdir())
    assert {"config.json", "llm_config.json", "vit_config.json", "preprocessor_config.json",
            "ema.safetensors", "ae.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert files == sorted(p.name for p in same.iterdir())
    for name in files:
        assert (ref / name).read_bytes() == (same / name).read_bytes(), name
    for name in ("ema.safetensors", "ae.safetensors"):
        assert (ref / name).read_bytes() != (other / name).read_bytes(), name


def test_pos_embed_tables_are_the_ones_vllm_computes(checkpoint):
    """vLLM recomputes vit_pos_embed instead of loading it; the diffusion stage loads latent_pos_embed."""
    from vllm.model_executor.models.bagel import PositionEmbedding

    d = bagel.PRESETS["tiny"]
    for side in (d.patches_per_side, d.max_latent_size):
        vllm_table = torch.from_numpy(PositionEmbedding._get_2d_sincos_pos_embed(d.hidden, side)).float()
        torch.testing.assert_close(bagel.sincos_2d(d.hidden, side), vllm_table, rtol=0, atol=1e-6)
    with safe_open(checkpoint("bagel") / "ema.safetensors", framework="pt") as f:
        stored = f.get_tensor("latent_pos_embed.pos_embed")
    assert stored.dtype == torch.bfloat16
    torch.testing.assert_close(stored.float(), bagel.sincos_2d(d.hidden, d.max_latent_size), rtol=1e-2, atol=1e-2)


def test_full_preset_has_the_real_dimensions(tmp_path):
    """`full` without its ~29 GB of weights: configs as vLLM reads them, and parameter counts."""
    from vllm.transformers_utils.configs.bagel import BagelConfig

    bagel.build(tmp_path, preset="full", seed=0, weights=False)
    assert not list(tmp_path.glob("*.safetensors"))
    config = BagelConfig.from_pretrained(tmp_path)
    llm, vit = config.llm_config, config.vit_config
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (3584, 28, 28, 4)
    assert (llm.intermediate_size, llm.vocab_size, llm.qk_norm) == (18944, 152064, True)
    assert (vit.hidden_size, vit.num_hidden_layers, vit.image_size, vit.patch_size) == (1152, 27, 980, 14)
    assert config.vit_max_num_patch_per_side == vit.image_size // vit.patch_size == 70
    assert config.vae_config == {"downsample": 8, "z_channels": 16}
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": 980, "width": 980}

    d = bagel.PRESETS["full"]
    ema, ae = bagel.ema_spec(d), bagel.ae_spec(d)
    assert (len(ae), _count(ae)) == (244, 83_819_683)  # FLUX's ae.safetensors
    assert 14.5e9 < _count(ema) < 14.7e9  # BAGEL-7B-MoT: 7B active, ~14.6B stored (29 GB bf16)
    assert sum(n.startswith("vit_model.vision_model.encoder.layers.") for n in ema) == 26 * 16


@pytest.mark.engine
def test_weights_cover_every_vllm_parameter(bagel_llm, checkpoint):
    """Every parameter of vLLM's model comes from the checkpoint; what vLLM skips is the generation side."""
    path = checkpoint("bagel")
    names = _names(path / "ema.safetensors") + _names(path / "ae.safetensors")
    loaded, skipped = set(), set()
    for name in names:
        if any(k in name for k in GENERATION_KEYS) or name.startswith(("encoder.", "decoder.")):
            skipped.add(name)
        elif name != "vit_pos_embed.pos_embed":  # vLLM recomputes this table
            # vLLM fuses q/k/v and gate/up into one parameter each
            name = re.sub(r"\.[qkv]_proj\.", ".qkv_proj.", name)
            loaded.add(re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", name))
    [vllm_names] = bagel_llm.apply_model(_vllm_parameter_names)
    assert loaded == set(vllm_names)

    # The generation expert mirrors every understanding weight of the LLM, the final norm included.
    und = {n for n in names if n.startswith("language_model.model.layers.") and "moe_gen" not in n}
    und.add("language_model.model.norm.weight")
    assert {n.replace("_moe_gen", "") for n in skipped if "moe_gen" in n} == und
    assert {n.split(".")[0] for n in skipped if "moe_gen" not in n} == {
        "latent_pos_embed", "time_embedder", "vae2llm", "llm2vae", "encoder", "decoder"}


# ------------------------------------------------------------ vLLM serving


def _transformers_llm(path):
    """The checkpoint's LLM in transformers: Qwen2 + per-head q/k RMSNorm before RoPE.

    transformers' Qwen2 has no q/k norm (BAGEL's qk_norm); Qwen3 has exactly
    that one, with the same q/k/v biases (attention_bias) plus an o_proj bias
    Qwen2 lacks, set to zero here.
    """
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = json.loads((path / "config.json").read_text())["llm_config"]
    config = Qwen3Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["hidden_size"] // c["num_attention_heads"],
        rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"], max_position_embeddings=c["max_position_embeddings"],
        attention_bias=True, tie_word_embeddings=False, use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    weights = load_file(path / "ema.safetensors")
    state = {k.removeprefix("language_model."): v.float() for k, v in weights.items()
             if k.startswith("language_model.") and "moe_gen" not in k}
    state.update({k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.endswith("o_proj.bias")})
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def _transformers_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    tokens, logprobs = list(ids), []
    for _ in range(n):
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
        tokens.append(int(lp.argmax()))
        logprobs.append(float(lp.max()))
    return tokens[len(ids):], logprobs


@pytest.mark.engine
def test_text2text_matches_transformers(bagel_llm, checkpoint):
    first, again = (bagel_llm.generate([TEXT_PROMPT], _greedy(), use_tqdm=False)[0] for _ in range(2))
    out = first.outputs[0]
    assert out.token_ids == again.outputs[0].token_ids
    assert len(out.token_ids) == 8

    model = _transformers_llm(checkpoint("bagel"))
    tokens, logprobs = _transformers_greedy(model, list(first.prompt_token_ids), 8)
    assert list(out.token_ids) == tokens
    # Both run float32; the tolerance covers kernel differences (~1e-5 seen), far below the top-2 margins.
    vllm_logprobs = [step[t].logprob for step, t in zip(out.logprobs, out.token_ids)]
    assert vllm_logprobs == pytest.approx(logprobs, abs=1e-3)


@pytest.mark.engine
def test_img2text_is_conditioned_on_the_image(bagel_llm, checkpoint):
    path = checkpoint("bagel")
    vit = json.loads((path / "config.json").read_text())["vit_config"]
    red = Image.new("RGB", (64, 48), (220, 30, 30))
    noise = Image.fromarray(torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(0)).byte().numpy())
    requests = [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": im}} for im in (red, noise, red)]
    outs = bagel_llm.generate(requests, _greedy(), use_tqdm=False)

    # vLLM's processor expands the one <|image_pad|> to exactly the ViT's patch count.
    pad = bagel_llm.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    assert outs[0].prompt_token_ids.count(pad) == (vit["image_size"] // vit["patch_size"]) ** 2

    def first_step(out) -> dict[int, float]:
        return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}

    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids  # deterministic
    assert first_step(outs[0]) == pytest.approx(first_step(outs[2]), abs=1e-5)
    assert first_step(outs[0]) != pytest.approx(first_step(outs[1]), abs=1e-2)  # the image matters
