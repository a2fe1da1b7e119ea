"""DiT options (multi-GPU, fp8, compile) from `vllm serve --omni` flags and the stage config."""

from __future__ import annotations

import pytest

from vllm_omni_plugin.diffusion.acceleration import DitOptions
from vllm_omni_plugin.diffusion.parallel import ParallelConfig
from vllm_omni_plugin.orchestrator.stage_config import StageConfigError, parse_stage_config

STAGES = """\
name: qwen-image-2gpu
architectures: [QwenImagePipeline]
stages:
  - id: dit
    type: diffusion
    final_output: true
    default_sampling_params: {num_inference_steps: 3}
    dit_options: {cfg_degree: 2, quantization: fp8}
"""


def test_flags_override_the_stage_config(checkpoint, tmp_path):
    from vllm_omni_plugin.server.flags import parse_args
    from vllm_omni_plugin.server.config import ConfigError, OmniServerConfig

    model = str(checkpoint("qwen-image"))
    path = tmp_path / "stages.yaml"
    path.write_text(STAGES)
    config = OmniServerConfig.from_args(parse_args([model, "--stage-configs-path", str(path)]))
    assert config.dit_options == DitOptions(parallel=ParallelConfig(cfg_degree=2), quantization="fp8")
    assert config.stage_defaults == {"num_inference_steps": 3}
    args = parse_args([model, "--stage-configs-path", str(path), "--omni-cfg-parallel-size", "1",
                       "--omni-ulysses-degree", "2", "--omni-dit-compile", "regional"])
    config = OmniServerConfig.from_args(args)
    assert config.dit_options == DitOptions(parallel=ParallelConfig(ulysses_degree=2), quantization="fp8",
                                            compile="regional")
    assert OmniServerConfig.from_args(parse_args([model])).dit_options == DitOptions()  # nothing set: one device
    with pytest.raises(ConfigError, match="--omni-cfg-parallel-size.*cfg_degree must be a positive integer"):
        OmniServerConfig.from_args(parse_args([model, "--omni-cfg-parallel-size", "0"]))
    with pytest.raises(SystemExit):  # argparse choices
        parse_args([model, "--omni-dit-quantization", "int4"])
    with pytest.raises(SystemExit):  # CUDA-graph replay of regional blocks was removed (it failed on the H200)
        parse_args([model, "--omni-dit-compile", "cudagraphs"])
    with pytest.raises(ConfigError, match="not multi-stage"):
        OmniServerConfig.from_args(parse_args([str(checkpoint("bagel")), "--omni-ring-degree", "2"]))
    with pytest.raises(ConfigError, match="only BAGEL's DiT stage takes it"):
        OmniServerConfig.from_args(parse_args([model, "--omni-dit-attention-mode", "varlen"]))


def test_multistage_diffusion_stage_takes_compile_and_cfg_batch(checkpoint, tmp_path):
    """BAGEL's DiT stage: --omni-dit-compile, --omni-cfg-parallel-size, --omni-dit-attention-mode and the
    stage config's cfg_batch / attention_mode reach its dit_options (StageOrchestrator applies them); sequence parallelism / fp8 stay refused."""
    from pathlib import Path

    import vllm_omni_plugin.families.bagel as family
    from vllm_omni_plugin.server.flags import parse_args
    from vllm_omni_plugin.server.config import ConfigError, OmniServerConfig

    bagel = str(checkpoint("bagel"))
    assert OmniServerConfig.from_args(parse_args([bagel])).stage_config.final_stage.dit_options == {}
    config = OmniServerConfig.from_args(parse_args([bagel, "--omni-dit-compile", "regional"]))
    assert config.stage_config.final_stage.dit_options == {"compile": "regional"}
    assert config.stage_config.stages[0].dit_options == {}  # the AR stage is untouched
    text = (Path(family.__file__).parent / "stage_config.yaml").read_text()
    path = tmp_path / "bagel.yaml"
    path.write_text(text.replace("    final_output: true", "    final_output: true\n    dit_options: {cfg_batch: false}"))
    config = OmniServerConfig.from_args(parse_args([bagel, "--stage-configs-path", str(path), "--omni-dit-compile",
                                                    "regional"]))
    assert config.stage_config.final_stage.dit_options == {"cfg_batch": False, "compile": "regional"}
    config = OmniServerConfig.from_args(parse_args([bagel, "--stage-configs-path", str(path),
                                                    "--omni-cfg-parallel-size", "2"]))
    assert config.stage_config.final_stage.dit_options == {"cfg_batch": False, "cfg_degree": 2}
    config = OmniServerConfig.from_args(parse_args([bagel, "--omni-dit-attention-mode", "varlen"]))
    assert config.stage_config.final_stage.dit_options == {"attention_mode": "varlen"}
    path.write_text(text.replace("    final_output: true", "    final_output: true\n    dit_options: {attention_mode: per_row}"))
    config = OmniServerConfig.from_args(parse_args([bagel, "--stage-configs-path", str(path)]))
    assert config.stage_config.final_stage.dit_options == {"attention_mode": "per_row"}
    config = OmniServerConfig.from_args(parse_args([bagel, "--stage-configs-path", str(path),
                                                    "--omni-dit-attention-mode", "padded"]))  # the flag wins
    assert config.stage_config.final_stage.dit_options == {"attention_mode": "padded"}
    with pytest.raises(SystemExit):
        parse_args([bagel, "--omni-dit-attention-mode", "masked"])
    with pytest.raises(ConfigError, match="--omni-dit-quantization.*not multi-stage.*takes attention_mode, cfg_batch, "
                       "cfg_degree, compile"):
        OmniServerConfig.from_args(parse_args([bagel, "--omni-dit-quantization", "fp8"]))


def test_stage_config_dit_options_are_validated():
    with pytest.raises(StageConfigError, match="dit_options.*unknown parallel setting"):
        parse_stage_config(STAGES.replace("cfg_degree: 2", "cfg_degre: 2"), "s.yaml")
    with pytest.raises(StageConfigError, match="diffusion stages only"):
        parse_stage_config(STAGES.replace("type: diffusion", "type: llm"), "s.yaml")


def test_fp8_static_on_every_entry_point(checkpoint, tmp_path):
    """quantization="fp8_static" from the flag, from the stage config and into Omni's options (the engine
    applying it, with calibration at load, is tests/diffusion/test_fp8_static.py)."""
    from vllm_omni_plugin import Omni
    from vllm_omni_plugin.diffusion.acceleration import QUANTIZATIONS
    from vllm_omni_plugin.server.config import OmniServerConfig
    from vllm_omni_plugin.server.flags import make_parser, parse_args

    model = str(checkpoint("qwen-image"))
    flag = next(a for a in make_parser()._actions if "--omni-dit-quantization" in a.option_strings)
    assert tuple(flag.choices) == QUANTIZATIONS  # the flag offers exactly what DitOptions takes
    config = OmniServerConfig.from_args(parse_args([model, "--omni-dit-quantization", "fp8_static"]))
    assert config.dit_options == DitOptions(quantization="fp8_static")
    path = tmp_path / "stages.yaml"
    path.write_text(STAGES.replace("quantization: fp8", "quantization: fp8_static"))
    config = OmniServerConfig.from_args(parse_args([model, "--stage-configs-path", str(path)]))
    assert config.dit_options == DitOptions(parallel=ParallelConfig(cfg_degree=2), quantization="fp8_static")
    with pytest.raises(ValueError, match="cuda_graphs: these apply to diffusers DiT models, not to the multi-stage"):
        Omni(str(checkpoint("bagel")), quantization="fp8_static")


def test_cuda_graph_options_on_every_entry_point(checkpoint, tmp_path):
    """--omni-dit-cuda-graphs / --omni-dit-cuda-graph-max over the stage config's dit_options; Omni(...) on
    CPU refuses them with a ValueError naming the device; multi-stage models refuse them."""
    from vllm_omni_plugin import Omni
    from vllm_omni_plugin.server.flags import parse_args
    from vllm_omni_plugin.server.config import ConfigError, OmniServerConfig

    model = str(checkpoint("qwen-image"))
    path = tmp_path / "stages.yaml"
    path.write_text(STAGES.replace("{cfg_degree: 2, quantization: fp8}", "{cuda_graphs: true, cuda_graph_max: 3}"))
    config = OmniServerConfig.from_args(parse_args([model, "--stage-configs-path", str(path)]))
    assert config.dit_options == DitOptions(cuda_graphs=True, cuda_graph_max=3)
    config = OmniServerConfig.from_args(parse_args([model, "--stage-configs-path", str(path),
                                                    "--omni-dit-cuda-graph-max", "5"]))
    assert config.dit_options == DitOptions(cuda_graphs=True, cuda_graph_max=5)
    config = OmniServerConfig.from_args(parse_args([model, "--omni-dit-cuda-graphs"]))
    assert config.dit_options == DitOptions(cuda_graphs=True)
    with pytest.raises(ConfigError, match="--omni-dit-cuda-graph-max.*cuda_graph_max must be a positive integer"):
        OmniServerConfig.from_args(parse_args([model, "--omni-dit-cuda-graphs", "--omni-dit-cuda-graph-max", "0"]))
    with pytest.raises(ConfigError, match="--omni-dit-cuda-graphs.*not multi-stage"):
        OmniServerConfig.from_args(parse_args([str(checkpoint("bagel")), "--omni-dit-cuda-graphs"]))
    with pytest.raises(ValueError, match="cuda_graphs needs the DiT on a CUDA GPU; it is on cpu"):
        Omni(model, dtype="float32", device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="quantization and cuda_graphs: these apply to diffusers DiT models"):
        Omni(str(checkpoint("bagel")), device="cpu", cuda_graphs=True)
