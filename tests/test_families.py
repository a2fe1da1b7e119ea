"""The family registry (vllm_omni_plugin/registry.py): discovery by folder, lazy targets, identify()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from vllm_omni_plugin import registry
from vllm_omni_plugin.registry import Family, families, identify


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_every_shipped_family_is_found_and_its_targets_resolve():
    found = families()
    assert {"bagel", "flux", "glm_image", "qwen_image", "wan"} <= set(found)
    for fam in found.values():
        assert fam.package == f"vllm_omni_plugin.families.{fam.name}"
        targets = [*fam.pipelines.values(), *fam.stages.values(), *fam.checkpoints.values(),
                   *(t for t in (fam.orchestrator, fam.vllm_setup) if t is not None)]
        for target in targets:
            module, attr = fam.resolve(target)
            assert module.startswith("vllm_omni_plugin."), target
        if fam.stage_config is not None:
            assert fam.stage_config_path().is_file()


def test_discovery_imports_no_family_code():
    # The declarations only: no torch, diffusers, vLLM, and no family module beyond its __init__.
    code = ("import sys; from vllm_omni_plugin.registry import families, identify; families(); "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'vllm', 'transformers')]; "
            "code = [m for m in sys.modules if m.startswith('vllm_omni_plugin.families.') and m.count('.') > 2]; "
            "print(heavy, code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_a_family_is_a_folder(tmp_path, monkeypatch):
    """A new sub-package with a FAMILY is found; its code is imported only when a target is loaded."""
    root = tmp_path / "fakefams"
    (root / "alpha").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "alpha" / "__init__.py").write_text(textwrap.dedent("""
        from vllm_omni_plugin.registry import Family
        FAMILY = Family(summary="alpha", pipelines={"AlphaPipeline": ".pipeline:AlphaStepwise"},
                        checkpoints={"alpha": ".checkpoint:build"})
    """))
    (root / "alpha" / "pipeline.py").write_text("AlphaStepwise = 'the class'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "FAMILIES_PACKAGE", "fakefams")
    registry.families.cache_clear()
    try:
        found = registry.families()
        assert list(found) == ["alpha"] and found["alpha"].name == "alpha"
        assert "fakefams.alpha.pipeline" not in sys.modules
        family, target = registry.pipeline_target("AlphaPipeline")
        assert family.load(target) == "the class"
        assert registry.checkpoint_builders() == {"alpha": found["alpha"]}
        (root / "beta").mkdir()
        (root / "beta" / "__init__.py").write_text("X = 1\n")  # a folder without a declaration
        registry.families.cache_clear()
        with pytest.raises(TypeError, match="fakefams.beta is a family folder but declares no FAMILY"):
            registry.families()
    finally:
        registry.families.cache_clear()


def test_two_families_claiming_one_name_are_refused_naming_both():
    a = registry._named(Family(summary="a", pipelines={"P": ".x:A"}), "a", "pkg.a")
    b = registry._named(Family(summary="b", pipelines={"P": ".y:B"}), "b", "pkg.b")
    with pytest.raises(ValueError, match=r"families 'a' and 'b' both declare pipelines 'P'"):
        registry._check_unique({"a": a, "b": b})


def test_family_params_join_the_shared_vocabulary_and_must_agree():
    from vllm_omni_plugin.diffusion.capabilities import DECLARABLE_FIELDS
    from vllm_omni_plugin.diffusion.params import ResolvedParams, SamplingParams
    from vllm_omni_plugin.request.protocol import GenerationParams

    declared = {name for fam in families().values() for name in fam.params}
    assert declared and declared == set(registry.params())
    for name in declared:  # a field of the request, of what ran, of the wire, declarable by a model
        assert name in SamplingParams.__dataclass_fields__ and name in ResolvedParams.__dataclass_fields__
        assert name in GenerationParams.model_fields and name in DECLARABLE_FIELDS
    for alias, name in registry.param_aliases().items():
        assert getattr(SamplingParams(**{alias: 2.0}), name) == 2.0 and alias in GenerationParams.model_fields

    scale = registry.Param(float, "a scale", ge=0.0)
    a = registry._named(Family(summary="a", params={"s": scale}), "a", "pkg.a")
    same = registry._named(Family(summary="b", params={"s": scale}), "b", "pkg.b")
    assert registry.merged_params({"a": a, "b": same}) == {"s": scale}  # declared alike: one field
    other = registry._named(Family(summary="b", params={"s": registry.Param(int, "a count")}), "b", "pkg.b")
    with pytest.raises(ValueError, match=r"families 'a' and 'b' declare param 's' differently"):
        registry.merged_params({"a": a, "b": other})
    shadow = registry._named(Family(summary="c", params={"t": registry.Param(float, "t", aliases=("s",))}), "c", "c")
    with pytest.raises(ValueError, match="param alias 's'"):
        registry.merged_params({"a": a, "c": shadow})
    with pytest.raises(TypeError, match="int or float"):
        registry.Param(str, "text")


def test_a_declaration_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="orchestrator and input_processor come together"):
        Family(summary="x", orchestrator=".o:O")
    with pytest.raises(ValueError, match="multi-stage `stages` need an orchestrator"):
        Family(summary="x", stages={"A": ".p:P"})
    with pytest.raises(ValueError, match="device_checkpoints"):
        Family(summary="x", checkpoints={"a": ".c:build"}, device_checkpoints=("b",))


def test_identify_reads_what_the_checkpoint_says(tmp_path):
    _write(tmp_path / "qwen" / "model_index.json", {"_class_name": "QwenImagePipeline"})
    _write(tmp_path / "glm" / "model_index.json", {"_class_name": "GlmImagePipeline"})
    _write(tmp_path / "other" / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    _write(tmp_path / "bagel" / "config.json", {"architectures": ["BagelForConditionalGeneration"], "model_type": "bagel"})
    _write(tmp_path / "bagel-by-type" / "config.json", {"architectures": [], "model_type": "bagel"})
    _write(tmp_path / "llm" / "config.json", {"architectures": ["Qwen2ForCausalLM"]})
    (tmp_path / "empty").mkdir()
    cases = {
        "qwen": ("diffusers", "qwen_image", "diffusion"),
        "glm": ("diffusers", "glm_image", "multi-stage"),
        "other": ("diffusers", None, "diffusion"),  # the generic fallback serves it
        "bagel": ("transformers", "bagel", "multi-stage"),
        "bagel-by-type": ("transformers", "bagel", "multi-stage"),
        "llm": ("transformers", None, "multi-stage"),
        "empty": (None, None, None),
    }
    for name, (layout, family, kind) in cases.items():
        info = identify(tmp_path / name)
        assert (info.layout, info.family.name if info.family else None, info.kind) == (layout, family, kind), name
    assert identify(tmp_path / "glm").names == ("GlmImagePipeline",)
