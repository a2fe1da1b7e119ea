"""Without a server: model knobs, and how the multi-stage server's settings come
together (stage config + vLLM serve flags -> the args vLLM's own server is started with)."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.request import RequestError, build_sampling_params


def test_knobs_are_typed_by_the_family_declaration():
    from vllm_omni_plugin.families.bagel.pipeline import BagelStepwise

    ext = BagelStepwise.capabilities.knobs
    p, _, _ = build_sampling_params(
        {"prompt": "p", "cfg_text_scale": "3", "cfg_interval": "[0.5, 1]", "cfg_renorm_type": "channel"}, knobs=ext)
    assert p.extra == {"cfg_text_scale": 3.0, "cfg_interval": (0.5, 1.0), "cfg_renorm_type": "channel"}
    with pytest.raises(RequestError, match="unknown parameter"):
        build_sampling_params({"prompt": "p", "cfg_text_scale": 3.0})  # not this model's knob
    with pytest.raises(RequestError, match="list of 2 numbers"):
        build_sampling_params({"prompt": "p", "cfg_interval": [1]}, knobs=ext)


def test_multistage_settings_precedence(checkpoint, tmp_path):
    from vllm_omni_plugin.server.flags import parse_args
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


def test_vllm_server_args_of_the_ar_stage(checkpoint, tmp_path):
    """What `vllm serve <bagel> --omni` hands vLLM's own server: command-line flags over the stage
    config's engine args, the AR stage's sampling defaults as vLLM's generation-config override
    (an explicit --override-generation-config wins), as AsyncEngineArgs reads them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_omni_plugin.server.flags import parse_args
    from vllm_omni_plugin.server.config import OmniServerConfig
    from vllm_omni_plugin.server.launch import ar_stage_args

    from .conftest import BAGEL_STAGE_CONFIG

    path = tmp_path / "stages.yaml"
    path.write_text(BAGEL_STAGE_CONFIG)
    args = parse_args([str(checkpoint("bagel")), "--stage-configs-path", str(path), "--max-model-len", "512",
                       "--override-generation-config", '{"max_new_tokens": 3}'])
    for key, value in ar_stage_args(args, OmniServerConfig.from_args(args)).items():
        setattr(args, key, value)
    engine = AsyncEngineArgs.from_cli_args(args)
    assert engine.max_model_len == 512 and engine.enforce_eager is True  # flag > stage config > vLLM
    assert engine.hf_overrides == {"architectures": ["OmniBagelForConditionalGeneration"]}
    assert engine.limit_mm_per_prompt == {"image": 1, "vae_image": 1}
    kv = engine.kv_transfer_config
    kv = kv if isinstance(kv, dict) else kv.model_dump()
    assert kv["kv_connector"] == "OmniKVConnector" and kv["kv_connector_extra_config"]["transfer_dir"]
    assert engine.override_generation_config == {"temperature": 0.0, "max_new_tokens": 3}


def test_allowlist_keeps_every_plugin_that_would_load(monkeypatch):
    from importlib.metadata import entry_points

    from vllm_omni_plugin.server.plugin import allowlist_omni

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    names = set(allowlist_omni().split(","))
    assert "omni" in names and {ep.name for ep in entry_points(group="vllm.general_plugins")} <= names
    assert not {ep.name for ep in entry_points(group="vllm.endpoint_plugins")} - {"omni"} & names
    monkeypatch.setenv("VLLM_PLUGINS", "mine")
    assert allowlist_omni() == "mine,omni"
