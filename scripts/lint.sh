#!/usr/bin/env bash
# Lint and the import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]); .ci/run runs
# this before the tests and fails on either. Needs .venv (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/lint-imports
