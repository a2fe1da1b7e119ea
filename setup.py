"""Package list only; all other metadata lives in pyproject.toml.

setuptools cannot combine `packages.find` with the package-dir mapping of the
three top-level folders, so the list is assembled here: everything under
vllm_omni_plugin/ plus the mapped folders, plus the `vllm_omni` shim that
vLLM's `--omni` hook imports (docs/server.md).
"""

from setuptools import find_packages, setup

MAPPED = ["vllm_omni_plugin.patches", "vllm_omni_plugin.model_registry", "vllm_omni_plugin.stage_configs"]

# `vllm_omni` only delegates `vllm serve ... --omni` to vllm_omni_plugin.server.cli.
SHIM = find_packages(include=["vllm_omni", "vllm_omni.*"])

setup(packages=find_packages(include=["vllm_omni_plugin", "vllm_omni_plugin.*"]) + MAPPED + SHIM)
