"""Without a server: the text-answer builder, model knobs, and how the
multi-stage server's settings come together (stage config + vLLM serve flags)."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.request import Limits, RequestError, build_sampling_params, build_text_request


def test_text_request_resolves_over_stage_defaults():
    defaults = {"temperature": 0.0, "max_tokens": 256}
    t = build_text_request({"messages": [], "max_completion_tokens": "7", "stop": "\n", "model": "m"}, defaults=defaults)
    assert t.sampling == {"temperature": 0.0, "max_tokens": 7, "stop": ["\n"]}
    assert defaults == {"temperature": 0.0, "max_tokens": 256}  # shared defaults untouched
    assert build_text_request({"temperature": None}, defaults=defaults).sampling == defaults  # null = unset


@pytest.mark.parametrize("fields,param,fragment", [
    ({"size": "64x64"}, "size", "modalities"),
    ({"cfg_text_scale": 2.0}, "cfg_text_scale", "modalities"),
    ({"tools": []}, "tools", "unsupported parameter"),
    ({"n": 9}, "n", "--omni-max-n"),
    ({"max_tokens": 0}, "max_tokens", "positive integer"),
    ({"stop": [1]}, "stop", "list of strings"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "conflicts"),
])
def test_text_request_errors(fields, param, fragment):
    with pytest.raises(RequestError) as e:
        build_text_request(fields, limits=Limits(), extensions=("cfg_text_scale",))
    assert e.value.param == param and fragment in e.value.message


def test_knobs_are_typed_by_the_family_declaration():
    from vllm_omni_plugin.diffusion.pipelines.bagel import BagelStepwise

    ext = BagelStepwise.capabilities.knobs
    p, _, _ = build_sampling_params(
        {"prompt": "p", "cfg_text_scale": "3", "cfg_interval": "[0.5, 1]", "cfg_renorm_type": "channel"}, knobs=ext)
    assert p.extra == {"cfg_text_scale": 3.0, "cfg_interval": (0.5, 1.0), "cfg_renorm_type": "channel"}
    with pytest.raises(RequestError, match="unknown parameter"):
        build_sampling_params({"prompt": "p", "cfg_text_scale": 3.0})  # not this model's knob
    with pytest.raises(RequestError, match="list of 2 numbers"):
        build_sampling_params({"prompt": "p", "cfg_interval": [1]}, knobs=ext)


def test_multistage_settings_precedence(checkpoint, tmp_path):
    from vllm_omni_plugin.server.cli import parse_args
    from vllm_omni_plugin.server.config import ConfigError, OmniServerConfig

    from .conftest import BAGEL_STAGE_CONFIG

    path = tmp_path / "stages.yaml"
    path.write_text(BAGEL_STAGE_CONFIG)
    model = str(checkpoint("bagel"))
    args = parse_args([model, "--stage-configs-path", str(path), "--max-model-len", "512", "--enforce-eager",
                       "--default-sampling-params", '{"num_inference_steps": 3, "cfg_text_scale": 2.0}'])
    config = OmniServerConfig.from_args(args)
    assert config.multi_stage and config.stage_config.name == "bagel-cpu-test"
    # vLLM serve flags given on the command line; the stage config's engine_args stay underneath
    assert config.ar_engine_args == {"max_model_len": 512, "enforce_eager": True}
    assert config.stage_config.stage("ar").engine_args["max_model_len"] == 1024
    # --default-sampling-params over the final stage's defaults
    assert config.stage_config.stage("dit").default_sampling_params == {"num_inference_steps": 3, "cfg_text_scale": 2.0}
    assert config.stage_defaults == {"num_inference_steps": 3, "cfg_text_scale": 2.0}

    # no flags: the shipped stage config for the architecture
    config = OmniServerConfig.from_args(parse_args([model]))
    assert config.stage_config.name == "bagel" and config.ar_engine_args == {}

    bad = tmp_path / "bad.yaml"
    bad.write_text(BAGEL_STAGE_CONFIG.replace("max_batch_size", "x").replace("input_processor", "input_procesor"))
    with pytest.raises(ConfigError) as e:
        OmniServerConfig.from_args(parse_args([model, "--stage-configs-path", str(bad)]))
    assert str(bad) in str(e.value) and "input_procesor" in str(e.value) and "unknown field" in str(e.value)
