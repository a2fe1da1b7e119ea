"""The plugin as vLLM sees it: entry point, idempotent register(), declared patches."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config

from vllm_omni_plugin.checkpoints.tokenizers import QWEN2_MODEL_VOCAB, write_qwen2_tokenizer
from vllm_omni_plugin.model_registry import MM_PREFIX_ARCHITECTURES, OMNI_MODELS
from vllm_omni_plugin.patches import ORIGINAL, Patch, PatchError, all_patches, apply_all, status
from vllm_omni_plugin.plugin import register


@pytest.fixture(scope="module")
def registered():
    register()


@pytest.fixture(scope="session")
def plain_llm_dir(tmp_path_factory) -> Path:
    """An ordinary (non-multimodal) Qwen2 LLM checkpoint: its config and tokenizer."""
    out = tmp_path_factory.mktemp("plain-qwen2")
    write_qwen2_tokenizer(out)
    Qwen2Config(
        vocab_size=QWEN2_MODEL_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(out)
    return out


def model_config(path: Path, **kwargs):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), dtype="float32", **kwargs)


def upstream_is_mm_prefix_lm(config) -> bool:
    from vllm.config.model import ModelConfig

    return getattr(vars(ModelConfig)["is_mm_prefix_lm"], ORIGINAL).func(config)


def test_vllm_plugin_loader_discovers_the_entry_point():
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["omni"] is register


def test_general_plugins_in_a_fresh_process_apply_the_patches():
    # Exactly what each vLLM process does at start-up, in a clean interpreter.
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm_omni_plugin.patches import status;"
        "print([r.status for r in status()])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(["applied"] * len(all_patches()))


def test_register_twice_is_harmless(registered):
    from vllm import ModelRegistry
    from vllm.config.model import ModelConfig

    before = vars(ModelConfig)["is_mm_prefix_lm"]
    registered_before = {m.architecture: ModelRegistry.models[m.architecture] for m in OMNI_MODELS}
    register()
    register()
    assert vars(ModelConfig)["is_mm_prefix_lm"] is before
    assert {m.architecture: ModelRegistry.models[m.architecture] for m in OMNI_MODELS} == registered_before
    # Applying the patches again directly (a second plugin load) is a no-op too.
    assert [r.status for r in apply_all()] == ["already applied"] * len(all_patches())
    assert [r.status for r in status()] == ["applied"] * len(all_patches())


def test_omni_architectures_are_registered_with_vllm(registered):
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for model in OMNI_MODELS:
        assert model.architecture in supported


def test_every_patch_is_declared_completely():
    for patch in all_patches():
        for field in dataclasses.fields(patch):
            if field.name != "platforms":  # empty = every platform
                assert getattr(patch, field.name), f"patch {patch.name} leaves {field.name} empty"
        assert (Path(__file__).parents[1] / "patches" / f"{patch.name}.py").exists()


def test_a_moved_upstream_symbol_fails_naming_the_patch_and_vllm_version():
    import vllm

    real = all_patches()[0]
    moved = dataclasses.replace(real, name="moved_symbol", target="vllm.config.model:ModelConfig.no_such_attr")
    with pytest.raises(PatchError, match=rf"'moved_symbol'.*vLLM {vllm.__version__}.*no_such_attr"):
        moved.resolve()


def test_a_changed_upstream_signature_refuses_the_patch(registered):
    from vllm_omni_plugin.patches import _apply

    # A real upstream function whose signature differs from the one declared.
    changed = Patch(
        name="changed_signature", target="vllm.config.model:ModelConfig.get_head_size", why="t", how="t",
        upstream="t", checked=("0.32.0",), signature="(self, extra) -> int", requires=(),
        make_replacement=lambda original: original,
    )
    with pytest.raises(PatchError, match="'changed_signature'.*expected signature"):
        _apply(changed)


def test_a_patch_for_another_platform_is_neither_verified_nor_applied(registered):
    """A CPU-only fix must not touch CUDA behaviour: here, a CUDA-only patch on the CPU platform."""
    from vllm.config.model import ModelConfig

    from vllm_omni_plugin.patches import _apply

    before = vars(ModelConfig)["get_head_size"]
    elsewhere = Patch(
        name="cuda_only", target="vllm.config.model:ModelConfig.get_head_size", why="t", how="t",
        upstream="t", checked=("0.32.0",), signature="(self, extra) -> int",  # would be refused if verified
        requires=(), make_replacement=lambda original: (lambda self: 0), platforms=("cuda",),
    )
    result = _apply(elsewhere)
    assert result.status == "not applicable"
    assert "only for platform cuda; this process runs on cpu" in result.detail
    assert vars(ModelConfig)["get_head_size"] is before
    assert [p.platforms for p in all_patches()] == [(), ("cpu",), ("cpu",), ("cpu",), ("cpu",)]


def test_ordinary_llm_keeps_false(registered, plain_llm_dir):
    config = model_config(plain_llm_dir)
    assert config.is_mm_prefix_lm is False
    assert upstream_is_mm_prefix_lm(config) is False


def test_upstream_answer_is_kept_for_vllm_bagel(registered, checkpoint):
    config = model_config(checkpoint("bagel"))
    assert config.architectures == ["BagelForConditionalGeneration"]
    assert upstream_is_mm_prefix_lm(config) is True
    assert config.is_mm_prefix_lm is True


def test_omni_architecture_gets_true_even_where_upstream_says_false(registered, checkpoint):
    # The checkpoint declares is_mm_prefix_lm=False, which vLLM alone honours;
    # our architecture needs bidirectional image attention whatever the config says.
    arch = next(iter(MM_PREFIX_ARCHITECTURES))
    config = model_config(checkpoint("bagel"), hf_overrides={"architectures": [arch], "is_mm_prefix_lm": False})
    assert upstream_is_mm_prefix_lm(config) is False
    assert config.is_mm_prefix_lm is True


def test_omni_architecture_without_multimodal_inputs_stays_false(registered, checkpoint):
    # Same gate vLLM applies to its own list: text-only deployments keep every backend.
    arch = next(iter(MM_PREFIX_ARCHITECTURES))
    config = model_config(
        checkpoint("bagel"),
        hf_overrides={"architectures": [arch], "is_mm_prefix_lm": False},
        limit_mm_per_prompt={"image": 0},
    )
    assert config.is_mm_prefix_lm is False


def test_doctor_cli_lists_patch_and_architectures():
    out = subprocess.run(
        [str(Path(sys.executable).with_name("vllm-omni")), "doctor"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for patch in all_patches():
        assert f"{patch.name}" in out.stdout and "applied" in out.stdout
    for model in OMNI_MODELS:
        assert f"{model.architecture}" in out.stdout
    assert "default dtype of every stage on this platform: float32" in out.stdout  # the suite runs on CPU
    assert "  vec    layout cpu_vec (float32)" in out.stdout  # checked through vLLM's kernel
    assert "  vec16  layout cpu_vec (float32)" in out.stdout
    assert "status: ok" in out.stdout
