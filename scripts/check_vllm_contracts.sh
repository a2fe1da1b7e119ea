#!/usr/bin/env bash
# scripts/check_vllm_contracts.sh VERSION: the plugin's contracts (vllm_omni_plugin/contracts.py)
# against vLLM VERSION's source, in the CPU .venv, without installing it:
#   pip download --no-deps vllm==VERSION (the CUDA wheel), unzip its Python files into a folder,
#   put that folder first on PYTHONPATH (the .venv's CPU torch and the rest stay), run the checks.
# Modules that import without a GPU are inspected; the others are read from source. No engine starts.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.33.0}
WORK=${VLLM_CONTRACTS_DIR:-${TMPDIR:-/tmp}/vllm-contracts-$VERSION}
started=$(date +%s)
mkdir -p "$WORK"
wheel=$(ls "$WORK"/vllm-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  .venv/bin/python -m pip download -q --no-deps "vllm==$VERSION" -d "$WORK"
  wheel=$(ls "$WORK"/vllm-"$VERSION"-*.whl | head -1)
fi
rm -rf "$WORK/src"
.venv/bin/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.endswith('.py') or n.startswith('vllm-') and '.dist-info/' in n])" "$wheel" "$WORK/src"
PYTHONPATH="$WORK/src" .venv/bin/python -m vllm_omni_plugin.contracts
echo "vLLM $VERSION contracts: $(( $(date +%s) - started )) s"
