"""The stage config is the topology: every field reaches the orchestrator's engines.

Built without starting the AR engine (`create` would): what the orchestrator
would hand vLLM's AsyncEngineArgs and how it built the diffusion stage.
"""

from __future__ import annotations

import pytest

from vllm_omni_plugin.diffusion.params import SamplingParams
from vllm_omni_plugin.families.glm_image.pipeline import GlmImageStepwise
from vllm_omni_plugin.families.bagel.orchestrator import BagelOrchestrator
from vllm_omni_plugin.families.glm_image.orchestrator import GlmImageOrchestrator
from vllm_omni_plugin.orchestrator.offline import checkpoint_architectures, multistage_config
from vllm_omni_plugin.orchestrator.stage_config import builtin_stage_configs, parse_stage_config
from vllm_omni_plugin.orchestrator.stages import orchestrator_class

GLM = """
name: glm-test
architectures: [GlmImagePipeline]
stages:
  - id: prior
    type: llm
    subfolder: vision_language_encoder
    tokenizer_subfolder: processor
    engine_args: {max_model_len: 777}
    devices: "0"
    max_batch_size: 3
    default_sampling_params: {temperature: 0.5}
    connector: inline
  - id: decoder
    type: diffusion
    inputs_from: prior
    input_processor: glm_image_prior
    max_batch_size: 5
    default_sampling_params: {num_inference_steps: 7}
    final_output: true
"""


def test_the_shipped_configs_pick_their_family_code(checkpoint):
    configs = builtin_stage_configs()
    assert orchestrator_class(configs["bagel"]) is BagelOrchestrator
    assert orchestrator_class(configs["glm-image"]) is GlmImageOrchestrator
    # A diffusers directory names its pipeline class; GLM-Image's is multi-stage.
    assert checkpoint_architectures(checkpoint("glm-image")) == ["GlmImagePipeline"]
    assert multistage_config(checkpoint("glm-image")) is configs["glm-image"]
    assert multistage_config(checkpoint("qwen-image")) is None


def test_every_glm_stage_field_reaches_an_engine(checkpoint):
    model = checkpoint("glm-image")
    config = parse_stage_config(GLM, "glm.yaml")
    o = GlmImageOrchestrator(str(model), config, ar_engine_args={"max_model_len": 640}, dtype="float32")
    assert o.ar_model == str(model / "vision_language_encoder")
    # engine_args < the caller's (vllm serve flags); tokenizer and batch limit from the stage; the
    # model-wide dtype reaches the AR stage too (orchestrator/stage_dtype.py).
    assert o._ar_args == {"max_model_len": 640, "dtype": "float32", "tokenizer": str(model / "processor"),
                          "max_num_seqs": 3}
    assert set(o.stage_dtypes.values()) == {"float32"} and len(o.stage_dtypes) == 2
    assert isinstance(o.pipeline, GlmImageStepwise) and str(o.pipeline.device) == "cpu"
    assert o.engine.config.max_running == 5
    assert o.resolve(SamplingParams(prompt="x")).num_inference_steps == 7  # the diffusion stage's default
    assert o.ar_sampling["temperature"] == 0.5  # over generation_config.json's 0.9
    assert o.ar_defaults is None  # image-only: no text answers


def test_omni_kv_connector_wires_the_transfer_directory(checkpoint):
    config = builtin_stage_configs()["bagel"]
    o = BagelOrchestrator(str(checkpoint("bagel")), config, dtype="float32")
    kv = o._ar_args["kv_transfer_config"]
    assert kv["kv_connector"] == "OmniKVConnector"
    assert kv["kv_connector_extra_config"]["transfer_dir"] == o._transfer_dir
    assert o._ar_args["max_num_seqs"] == config.stage("ar").max_batch_size
    assert o.ar_defaults == dict(config.stage("ar").default_sampling_params)


def test_a_topology_the_orchestrator_does_not_run_is_refused(checkpoint):
    three = GLM.replace("final_output: true", "") + """
  - {id: extra, type: diffusion, inputs_from: decoder, input_processor: glm_image_prior, final_output: true}
"""
    with pytest.raises(ValueError, match="one llm stage feeding the final diffusion stage"):
        GlmImageOrchestrator(str(checkpoint("glm-image")), parse_stage_config(three, "three.yaml"), dtype="float32")
