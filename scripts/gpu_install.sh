#!/usr/bin/env bash
# Install the offline GPU stack on the H200 box (no network), from the repo root:
#
#   bash scripts/gpu_install.sh [PIECES_DIR]     # default /tmp/gpu-pieces, else ./.gpu-pieces
#
# 1. checks the pieces made by scripts/gpu_pieces.sh (SHA256SUMS), says which are missing;
# 2. reassembles and untars them to /tmp/gpu-wheels (skipped when already done);
# 3. `pip install --no-index --no-deps` into the box's python the wheels that are
#    not there at the pinned version ([replace] and [add] of scripts/gpu_requirements.txt,
#    plus the [if-needed] ones whose box version fails a requirement of the set);
# 4. installs this package, editable, from the checkout (no index, no build isolation);
# 5. verifies: torch/CUDA/NCCL/cuDNN versions, the imports, `pip check` (expected
#    complaints listed apart), `vllm-omni doctor`; prints the elapsed time.
# Idempotent: a second run installs nothing and takes seconds. Sets no environment
# variable for later commands and leaves the box's NCCL/NVSHMEM/torch settings
# (NCCL_NVLS_ENABLE, TORCH_SYMM_MEM_DISABLE_MULTICAST, NVSHMEM_DISABLE_NVLS) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

PIECES=${1:-${GPU_PIECES_DIR:-/tmp/gpu-pieces}}
[ -f "$PIECES/SHA256SUMS" ] || { [ -f .gpu-pieces/SHA256SUMS ] && PIECES=.gpu-pieces; }
WHEELS=${GPU_WHEELS_DIR:-/tmp/gpu-wheels}
PY=${PYTHON:-python3}
REQ=scripts/gpu_requirements.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
pip() { "$PY" -m pip "$@"; }

echo "== gpu_install: python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'), pieces $PIECES"

# --- 1+2. pieces -> /tmp/gpu-wheels -------------------------------------------------
[ -f "$PIECES/SHA256SUMS" ] || { echo "no $PIECES/SHA256SUMS: carry .gpu-pieces (scripts/gpu_pieces.sh)" >&2; exit 1; }
tarsum=$(awk '$2=="tar"{print $3}' "$PIECES/SHA256SUMS")
if [ -f "$WHEELS/.tarsum" ] && [ "$(cat "$WHEELS/.tarsum")" = "$tarsum" ]; then
  echo "== wheels already unpacked in $WHEELS ($(ls "$WHEELS"/*.whl | wc -l) wheels)"
else
  missing=$(grep -v '^#' "$PIECES/SHA256SUMS" | awk '{print $2}' | while read -r p; do [ -f "$PIECES/$p" ] || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "MISSING pieces in $PIECES: $(echo $missing)" >&2; exit 2
  fi
  (cd "$PIECES" && sha256sum --quiet -c <(grep -v '^#' SHA256SUMS)) || { echo "damaged pieces (above)" >&2; exit 2; }
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"
  cat $(grep -v '^#' "$PIECES/SHA256SUMS" | awk '{print "'"$PIECES"'/"$2}' | sort) | tar -x -C "$WHEELS"
  echo "$tarsum" >"$WHEELS/.tarsum"
  echo "== unpacked $(ls "$WHEELS"/*.whl | wc -l) wheels to $WHEELS ($(elapsed) s)"
fi

# --- 3. which wheels to install --------------------------------------------------------
todo=$("$PY" - "$WHEELS" "$REQ" <<'EOF'
import os, re, sys, zipfile
from importlib import metadata as md
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name as cn
from pip._vendor.packaging.version import Version

wheels_dir, reqfile = sys.argv[1:]
section, pinned = None, {}
for line in open(reqfile):
    s = line.strip()
    m = re.match(r"#\s*\[(\w[\w-]*)\]", s)
    if m:
        section = m.group(1); continue
    if s and not s.startswith("#"):
        n, v = s.split()[0].split("==")
        pinned[cn(n)] = (v, section)
files = {}
for f in os.listdir(wheels_dir):
    if f.endswith(".whl"):
        n, v = f.split("-")[:2]
        files[cn(n)] = (f, v)
installed = {}
for d in md.distributions():
    try:
        installed[cn(d.metadata["Name"])] = d.version
    except Exception:
        pass
absent = sorted(set(pinned) - set(files))
if absent:
    sys.exit(f"wheels missing from {wheels_dir}: {absent}")
# requirements of everything the set installs
reqs = {}
for key, (f, v) in files.items():
    if pinned.get(key, (None, None))[1] == "if-needed":
        continue
    with zipfile.ZipFile(os.path.join(wheels_dir, f)) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for r in re.findall(r"^Requires-Dist: (.*)$", meta, re.M):
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        reqs.setdefault(cn(req.name), []).append((key, req.specifier))
out = []
for key, (v, sec) in sorted(pinned.items()):
    have = installed.get(key)
    if sec in ("replace", "add"):
        if have != v:
            out.append(files[key][0])
    elif sec == "if-needed":
        bad = [f"{who} needs {spec}" for who, spec in reqs.get(key, [])
               if have is not None and not spec.contains(have, prereleases=True)]
        if have is None or bad:
            print(f"   if-needed: {key} {have} -> {v} ({'; '.join(bad) or 'absent'})", file=sys.stderr)
            out.append(files[key][0])
print("\n".join(os.path.join(wheels_dir, f) for f in out))
EOF
)
if [ -n "$todo" ]; then
  echo "== installing $(echo "$todo" | wc -l) wheels (pip --no-index --no-deps)"
  # shellcheck disable=SC2086
  pip install -q --no-index --no-deps --no-compile --no-cache-dir $todo
  echo "== wheels installed ($(elapsed) s)"
else
  echo "== every pinned wheel already installed"
fi

# --- 4. this package (editable: the checkout's code is what runs) ----------------------
here=$(pwd -P)
# -I: not fooled by the checkout's own folder (or its .egg-info) on sys.path.
if "$PY" -I -c '
import sys, importlib.util, importlib.metadata as md
d = md.distribution("vllm-omni-plugin")
assert any(ep.group == "vllm.general_plugins" for ep in d.entry_points)
spec = importlib.util.find_spec("vllm_omni_plugin")
sys.exit(0 if spec and spec.origin and spec.origin.startswith(sys.argv[1] + "/") else 1)
' "$here" 2>/dev/null && [ -x "$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')/vllm-omni" ]
then
  echo "== vllm-omni-plugin already installed editable from $here"
else
  pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
  echo "== installed vllm-omni-plugin (editable) from $here ($(elapsed) s)"
fi

# --- 5. verify ----------------------------------------------------------------------------
echo "== versions (python -I: what is installed, not the checkout on sys.path)"
"$PY" -I - <<'EOF'
import torch, vllm, diffusers, transformers, vllm_omni_plugin
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cuda available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count() if torch.cuda.is_available() else 0)
try:
    import ctypes
    torch.cuda.nccl.version()  # loads the library torch links against
    lib = next(l.split()[-1] for l in open("/proc/self/maps") if "libnccl.so" in l)
    v = ctypes.c_int(); ctypes.CDLL(lib).ncclGetVersion(ctypes.byref(v))
    print("nccl compiled", ".".join(map(str, torch.cuda.nccl.version())),
          "runtime", f"{v.value // 10000}.{v.value // 100 % 100}.{v.value % 100}", "from", lib)
except Exception as e:
    print("nccl: FAILED", type(e).__name__, e)
c = torch._C._cudnn
print("cudnn runtime", c.getRuntimeVersion(), "compiled", c.getCompileVersion())
try:
    print("cudnn usable by torch:", torch.backends.cudnn.is_available() and torch.backends.cudnn.version())
except Exception as e:
    print("cudnn: FAILED", type(e).__name__, str(e)[:300])
print("vllm", vllm.__version__, "| diffusers", diffusers.__version__,
      "| transformers", transformers.__version__, "| vllm_omni_plugin", vllm_omni_plugin.__file__)
import vllm.entrypoints.openai.api_server  # noqa: F401  (the server's import closure)
print("import vllm.entrypoints.openai.api_server: ok")
EOF

echo "== pip check (complaints about [skipped] packages and accepted pins are expected, docs/gpu.md)"
skipped=$(sed -n 's/^#[[:space:]]*\([A-Za-z0-9][A-Za-z0-9._-]*\)==.*--.*/\1/p' "$REQ" | tr 'A-Z_.' 'a-z--' | paste -sd'|')
accepted='^torch .*(requires|has requirement) (cuda-toolkit|nvidia-cusparselt-cu13|nvidia-nccl-cu13|nvidia-cublas|nvidia-nvjitlink)|^vllm .*(requires|has requirement) (numba|torchaudio|opencv)|^torchaudio .*(requires|has requirement) torch'
pc=$(pip check 2>&1 || true)
expected=$(echo "$pc" | grep -iE "requires ($skipped)[ ,]|$accepted" || true)
other=$(echo "$pc" | grep -v -iE "requires ($skipped)[ ,]|$accepted" | grep -v '^No broken' || true)
echo "   expected: $(echo "$expected" | grep -c . || true) line(s):"
echo "$expected" | sed 's/^/     /'
if [ -n "$other" ]; then echo "   OTHER:"; echo "$other" | sed 's/^/     /'; else echo "   other: none"; fi

echo "== vllm-omni doctor"
bindir=$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')
"$bindir/vllm-omni" doctor 2>&1 | tail -40 || echo "doctor exited $?"
echo "== gpu_install done in $(elapsed) s"
