"""Command-line failures are one clear line (the traceback behind --debug), and checkpoint
detection says what it looked for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd], capture_output=True, text=True, timeout=300, env=env)


def _error_lines(done: subprocess.CompletedProcess, prog: str) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(f"{prog}: error:")]


def test_a_transformers_model_without_a_stage_config_is_one_line_naming_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    done = _run(str(BIN / "vllm-omni"), "serve", str(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    (line,) = _error_lines(done, "vllm-omni")
    assert "no model_index.json" in line and "[LlamaForCausalLM]" in line and "BagelForConditionalGeneration" in line
    assert "--debug" in line

    debug = _run(str(BIN / "vllm-omni"), "serve", str(tmp_path), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_vllm_serve_omni_reports_an_empty_directory_in_one_line(tmp_path):
    done = _run(str(BIN / "vllm"), "serve", str(tmp_path), "--omni")
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    (line,) = _error_lines(done, "vllm serve --omni")
    assert "neither model_index.json (diffusers) nor config.json (transformers)" in line


def test_missing_weights_are_reported_by_us_not_as_a_missing_bin(checkpoint, tmp_path):
    from vllm_omni_plugin import Omni

    model = tmp_path / "qwen-image"
    shutil.copytree(checkpoint("qwen-image"), model)
    for f in (model / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError) as info:
        Omni(str(model), device="cpu")
    message = str(info.value)
    assert "transformer" in message and "*.safetensors" in message and "no weights" in message
    assert "diffusion_pytorch_model.bin" not in message


def test_a_sharded_index_with_a_missing_shard_names_it(checkpoint, tmp_path):
    from vllm_omni_plugin.diffusion.loader import check_component_weights, read_model_index

    model = tmp_path / "qwen-image"
    shutil.copytree(checkpoint("qwen-image"), model)
    vae = model / "vae"
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="00001-of-00002.safetensors, diffusion_pytorch_model-00002"):
        check_component_weights(model, read_model_index(model))


def test_a_missing_directory_and_a_non_diffusers_directory_say_what_they_are(tmp_path):
    from vllm_omni_plugin.diffusion.loader import read_model_index

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_model_index(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no model_index.json \(found config.json"):
        read_model_index(tmp_path)


def test_an_ar_stage_that_cannot_fit_names_the_field_and_the_value(checkpoint, tmp_path):
    # 10^9 tokens of KV cache (~477 GiB for the tiny BAGEL) fit no machine this runs on; given in the
    # stage config, it reaches the AR stage's sizing (vLLM's serve parser checks a --max-model-len flag itself).
    shipped = (ROOT / "vllm_omni_plugin" / "families" / "bagel" / "stage_config.yaml").read_text()
    config = tmp_path / "huge.yaml"
    config.write_text(shipped.replace("max_model_len: 16384", "max_model_len: 1000000000"))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # else the user sized it
    done = _run(str(BIN / "vllm-omni"), "serve", str(checkpoint("bagel")), "--stage-configs-path", str(config), env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    (line,) = _error_lines(done, "vllm-omni")
    assert "one 1000000000-token sequence needs" in line and "Lower max_model_len to " in line
    fits = int(line.split("--max-model-len ")[1].split("`")[0])
    assert 0 < fits <= 32768 and "stages[ar].engine_args.max_model_len" in line  # at most what the model takes


@pytest.mark.parametrize("store,fragment", [
    ("mysql://db/omni", "--omni-job-store 'mysql://db/omni': write sqlite:///PATH or postgresql://"),
    ("postgresql://nobody@127.0.0.1:1/omni", "--omni-job-store: cannot reach postgresql://nobody@127.0.0.1:1/omni"),
])
def test_a_bad_or_unreachable_job_store_is_one_line(checkpoint, store, fragment):
    done = _run(str(BIN / "vllm"), "serve", str(checkpoint("qwen-image")), "--omni", "--omni-job-store", store)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    (line,) = _error_lines(done, "vllm serve --omni")
    assert fragment in line, line
