"""Stage config schema: shipped configs are valid; bad YAML names file, field and fix."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.orchestrator.stage_config import (
    StageConfigError,
    builtin_stage_configs,
    load_stage_config,
    parse_stage_config,
    stage_config_for,
)

GOOD = """
name: two
architectures: [Foo]
stages:
  - {id: ar, type: llm}
  - {id: dit, type: diffusion, inputs_from: ar, input_processor: bagel_context, final_output: true}
"""


def test_shipped_configs_are_valid_and_chosen_by_architecture():
    configs = builtin_stage_configs()
    assert "bagel" in configs
    bagel = stage_config_for(["BagelForConditionalGeneration"])
    assert bagel is configs["bagel"]
    assert [s.id for s in bagel.stages] == ["ar", "dit"]
    assert bagel.final_stage.id == "dit"
    assert stage_config_for(["Qwen2ForCausalLM"]) is None


def test_good_config_parses():
    config = parse_stage_config(GOOD, "good.yaml")
    assert config.stage("dit").inputs_from == "ar"
    assert config.stage("ar").max_batch_size == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("type: llm}", "type: llm, max_batchsize: 4}"),
         r"(?s)bad\.yaml.*stages\[0\] \(id 'ar'\)\.max_batchsize: unknown field; allowed here: .*max_batch_size"),
        (GOOD.replace("type: llm}", "type: vllm}"), r"stages\[0\] \(id 'ar'\)\.type: Input should be 'llm' or 'diffusion'"),
        (GOOD.replace("inputs_from: ar,", "inputs_from: nope,"), r"inputs_from 'nope' must name an earlier stage \(ar\)"),
        (GOOD.replace(", final_output: true", ""), r"exactly one stage must set final_output: true"),
        (GOOD.replace("bagel_context", "my.module:fn"), r"unknown input_processor 'my.module:fn'; known: bagel_context"),
        (GOOD.replace("architectures: [Foo]\n", ""), r"architectures: required field is missing"),
        ("stages: [", r"bad\.yaml: not valid YAML"),
        ("- a\n- b\n", r"bad\.yaml: the top level must be a mapping"),
    ],
)
def test_bad_configs_name_file_field_and_fix(text, expected):
    with pytest.raises(StageConfigError, match=expected):
        parse_stage_config(text, "bad.yaml")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(StageConfigError, match=r"nope\.yaml: cannot read stage config"):
        load_stage_config(tmp_path / "nope.yaml")
