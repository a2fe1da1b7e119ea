"""`vllm-omni bench` pieces that need no server: prompt files, Poisson arrivals, flag errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_omni_plugin.bench.prompts import BUILTIN_PROMPTS, PromptFileError, load_prompts
from vllm_omni_plugin.bench.runner import BenchConfig, arrival_gaps

OMNI_CLI = Path(sys.executable).with_name("vllm-omni")


def test_prompt_files(tmp_path):
    assert load_prompts(None) == list(BUILTIN_PROMPTS)
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: expected"):
        load_prompts(tmp_path / "p.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_poisson_arrivals():
    assert arrival_gaps(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps(4000, 8.0, 1)
    assert gaps[0] == 0.0 and gaps == arrival_gaps(4000, 8.0, 1)
    assert np.mean(gaps[1:]) == pytest.approx(1 / 8.0, rel=0.06)
    # exponential: the standard deviation equals the mean
    assert np.std(gaps[1:]) == pytest.approx(np.mean(gaps[1:]), rel=0.08)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        BenchConfig(base_url="http://x", task="audio")
    with pytest.raises(ValueError, match="request_rate"):
        BenchConfig(base_url="http://x", request_rate=0)


def test_unreachable_server_is_one_line(tmp_path):
    proc = subprocess.run([str(OMNI_CLI), "bench", "--port", "9", "--ready-check-timeout-sec", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vllm-omni: error: http://127.0.0.1:9 is not ready after 1 s"), proc.stderr
