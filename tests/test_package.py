"""The package as a user gets it: `python -m build` makes an sdist and a wheel that `twine check`
accepts, with the version of vllm_omni_plugin/__init__.py; the wheel installs into a fresh venv and
`vllm-omni doctor` passes there.

The fresh venv reuses this environment's vLLM, torch and the rest (no index here, and a second
vLLM would be gigabytes): a `.pth` file puts this venv's site-packages after its own, and the wheel
is installed with `--no-deps`. Python does not run the `.pth` files of a directory a `.pth` adds,
so this checkout's editable install stays inactive there: the plugin that loads is the wheel's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import vllm_omni_plugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # A copy of the tree: building writes *.egg-info and build/ into the source folder, and an
    # egg-info in the checkout would shadow the installed entry points of later tests.
    src = tmp_path_factory.mktemp("src") / "vllm-omni-plugin"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "out"))
    # --no-isolation: build with this venv's setuptools + wheel (the test extra), no index needed
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    return out


def test_sdist_and_wheel_pass_twine_check(dist):
    version = vllm_omni_plugin.__version__
    wheel = dist / f"vllm_omni_plugin-{version}-py3-none-any.whl"
    sdist = dist / f"vllm_omni_plugin-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    names = set(zipfile.ZipFile(wheel).namelist())
    # package data and the mapped folders travel in the wheel
    for needed in ("vllm_omni_plugin/server/playground-page/index.html", "vllm_omni_plugin/families/bagel/stage_config.yaml",
                   "vllm_omni_plugin/patches/__init__.py", "vllm_omni/__init__.py", "vllm_omni_plugin/bench/cli.py"):
        assert needed in names, needed
    meta = zipfile.ZipFile(wheel).read(f"vllm_omni_plugin-{version}.dist-info/entry_points.txt").decode()
    assert "[vllm.general_plugins]" in meta and "[vllm.endpoint_plugins]" in meta and "vllm-omni =" in meta


def test_wheel_in_a_fresh_venv_passes_doctor(dist, tmp_path):
    version = vllm_omni_plugin.__version__
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "zz_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = dist / f"vllm_omni_plugin-{version}-py3-none-any.whl"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    # cwd: outside this checkout (`python -c` puts the working directory first on sys.path)
    where = subprocess.run(
        [str(py), "-c", "import vllm_omni_plugin, importlib.metadata as m; print(vllm_omni_plugin.__file__); "
         "print(m.version('vllm-omni-plugin'))"], check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert where[0].startswith(purelib) and where[1] == version  # the wheel's copy, not this checkout
    doctor = subprocess.run([str(env_dir / "bin" / "vllm-omni"), "doctor", "--json", "--contracts"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 0 and report["ok"], doctor.stdout[-3000:] + doctor.stderr[-3000:]
    assert report["plugin_version"] == version
    assert all(p["status"] == "applied" for p in report["patches"]), report["patches"]
    # the wheel's contract checks ran against the vLLM it found, and doctor says what each version had
    assert report["contracts"]["ok"] and report["contracts"]["vllm"] == report["vllm_version"]
    assert set(report["verified"]) >= {"0.32.0", "0.33.0"}
