"""One dtype rule for every stage (orchestrator/stage_dtype.py), as the AR stage's engine args see it.

The end-to-end check is the GLM-Image oracle: `glm_omni` (tests/engine_fixtures.py) is built
with no dtype at all and must equal diffusers' float32 pipeline pixel for pixel
(tests/test_glm_image_pipeline.py); before this rule its AR stage ran in the
checkpoint's bfloat16 and differed by a mean of 3.5-5 levels.
"""

from __future__ import annotations

import pytest
import torch

from vllm_omni_plugin.orchestrator.stage_config import StageConfigError, builtin_stage_configs, parse_stage_config
from vllm_omni_plugin.orchestrator.stage_dtype import ar_dtype, device_default_dtype, dtype_name, model_dtype
from vllm_omni_plugin.orchestrator.stages import ar_stage_engine_args


def test_dtype_names():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name("float") == "float32" and dtype_name("half") == "float16"
    assert dtype_name("auto") is None and dtype_name(None) is None


def test_precedence_is_the_same_for_every_stage():
    assert device_default_dtype("cpu") == "float32" and device_default_dtype("cuda") == "bfloat16"
    assert model_dtype(None, None, "cpu") == ar_dtype(None, None, None, None, "cpu") == "float32"
    assert model_dtype(None, None, "cuda") == ar_dtype(None, None, None, None, "cuda") == "bfloat16"
    assert model_dtype(None, "bfloat16", "cpu") == ar_dtype(None, None, None, "bfloat16", "cpu") == "bfloat16"
    assert model_dtype("float16", "bfloat16", "cpu") == ar_dtype(None, "float16", None, "bfloat16", "cpu") == "float16"
    # the AR stage's own values: explicit beats model-wide explicit; configured beats model-wide configured
    assert ar_dtype("float32", "bfloat16", None, None, "cuda") == "float32"
    assert ar_dtype(None, None, "auto", "float32", "cpu") == "auto"  # the stage config asks for the checkpoint's
    assert ar_dtype(None, "float32", "bfloat16", None, "cpu") == "float32"


@pytest.mark.parametrize("name", ["bagel", "glm-image"])
def test_ar_stage_engine_args_carry_the_rule(name, tmp_path):
    config = builtin_stage_configs()[name]
    model = str(tmp_path)
    assert ar_stage_engine_args(model, config, {}, fit=False)["dtype"] == "float32"  # this suite runs on CPU
    assert ar_stage_engine_args(model, config, {"dtype": "bfloat16"}, fit=False)["dtype"] == "bfloat16"
    wide = config.model_copy(update={"dtype": "bfloat16"})
    assert ar_stage_engine_args(model, wide, {}, fit=False)["dtype"] == "bfloat16"
    assert ar_stage_engine_args(model, wide, {"dtype": "float32"}, fit=False)["dtype"] == "float32"


def test_stage_config_dtype_is_validated():
    text = """
name: x
architectures: [X]
dtype: {dtype}
stages:
  - {{id: ar, type: llm, connector: omni_kv}}
  - {{id: dit, type: diffusion, inputs_from: ar, final_output: true}}
"""
    assert parse_stage_config(text.format(dtype="bfloat16"), "x.yaml").dtype == "bfloat16"
    with pytest.raises(StageConfigError, match="dtype"):
        parse_stage_config(text.format(dtype="float64"), "x.yaml")
