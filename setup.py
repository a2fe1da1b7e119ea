"""Package list only; all other metadata lives in pyproject.toml.

setuptools cannot combine `packages.find` with the package-dir mapping of the
three top-level folders, so the list is assembled here: everything under
vllm_omni_plugin/ plus the mapped folders.
"""

from setuptools import find_packages, setup

MAPPED = ["vllm_omni_plugin.patches", "vllm_omni_plugin.model_registry", "vllm_omni_plugin.stage_configs"]

setup(packages=find_packages(include=["vllm_omni_plugin", "vllm_omni_plugin.*"]) + MAPPED)
