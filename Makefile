# The two commands of README.md. Both (re)create .venv through one recipe.
.PHONY: setup demo test lint

setup:
	bash scripts/setup_env.sh

demo: setup
	.venv/bin/python -m vllm_omni_plugin.demo

test: setup
	.venv/bin/python -m pytest -q tests

lint: setup
	bash scripts/lint.sh
