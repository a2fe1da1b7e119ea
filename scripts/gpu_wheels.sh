#!/usr/bin/env bash
# Build the offline wheel set for the H200 box (Python 3.12, x86_64, CUDA 13).
#
#   bash scripts/gpu_wheels.sh            # -> .gpu-wheels/  (then scripts/gpu_pieces.sh)
#
# Downloads, one `pip download --no-deps --only-binary=:all:` per pinned line,
# exactly the wheels listed in scripts/gpu_requirements.txt ([replace], [add] and
# [if-needed] sections), removes anything else from the folder, checks that the
# set is closed (every requirement of every wheel is met by the set, by what the
# box already has, or is one of the [skipped] optional packages), and prints the
# sizes. Idempotent: wheels already there are kept. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

REQ=scripts/gpu_requirements.txt
DEST=${GPU_WHEELS_DIR:-.gpu-wheels}
PY=${PYTHON:-python3}
JOBS=${JOBS:-8}
mkdir -p "$DEST"

# This machine's pip config adds a find-links folder (CPU torch builds) and a
# constraints file; neither must leak into the box's wheel set.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_EXTRA_INDEX_URL || true

# Target: CPython 3.12 on glibc >= 2.31 x86_64 (the box: Python 3.12.3, a
# manylinux_2_31 wheel -- llguidance 1.7.6 -- is the newest tag in the set).
PIP_TARGET=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
  --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
  --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64
  --platform manylinux1_x86_64 --platform linux_x86_64 --platform any)

pins=$(grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$REQ" | sed 's/[[:space:]].*//')
echo "gpu_wheels: $(echo "$pins" | wc -l) pinned wheels from $REQ -> $DEST"

# Which pins are not in the folder yet (match on normalised name + version).
pinfile=$(mktemp); trap 'rm -f "$pinfile"' EXIT
echo "$pins" >"$pinfile"
missing=$("$PY" - "$DEST" "$pinfile" <<'EOF'
import os, re, sys
dest, pinfile = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
have = set()
for f in os.listdir(dest):
    if f.endswith(".whl"):
        n, v = f.split("-")[:2]
        have.add((norm(n), v))
for line in open(pinfile):
    n, v = line.strip().split("==")
    if (norm(n), v) not in have:
        print(line.strip())
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_wheels: downloading $(echo "$missing" | wc -l) wheel(s)"
  fail=0
  echo "$missing" | xargs -P "$JOBS" -I{} sh -c '
    "$0" -m pip download -q --disable-pip-version-check "$@" -d "'"$DEST"'" "{}" >/dev/null 2>"'"$DEST"'/.err.$$" \
      || { echo "FAILED: {}"; tail -3 "'"$DEST"'/.err.$$"; exit 1; }
    rm -f "'"$DEST"'/.err.$$"' "$PY" "${PIP_TARGET[@]}" || fail=1
  rm -f "$DEST"/.err.*
  [ "$fail" = 0 ] || { echo "gpu_wheels: some downloads failed" >&2; exit 1; }
fi

# Keep exactly the listed set; report sizes; check closure.
"$PY" - "$DEST" "$REQ" <<'EOF'
import os, re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.utils import canonicalize_name as cn
from pip._vendor.packaging.version import Version

dest, reqfile = sys.argv[1:]
section, pinned, skipped = None, {}, {}
for line in open(reqfile):
    s = line.strip()
    m = re.match(r"#\s*\[(\w[\w-]*)\]", s)
    if m:
        section = m.group(1); continue
    if section == "skipped" and re.match(r"#\s*[A-Za-z0-9][\w.-]*==", s):
        n, v = s.lstrip("# ").split()[0].split("==")
        skipped[cn(n)] = v
    elif s and not s.startswith("#"):
        n, v = s.split()[0].split("==")
        pinned[cn(n)] = (v, section)

# What the box already has (KINDS.md "Python packages already there"), with the
# versions known from sessions' pip output; None = present, version unknown.
BOX_KNOWN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
    "nvidia-nccl-cu13": "2.28.9", "nvidia-cudnn-cu13": "9.19.0.56",
    "nvidia-cusparselt-cu13": "0.8.0", "cuda-toolkit": "13.0.2",
    "nvidia-cublas": "13.1.0.3", "nvidia-nvjitlink": "13.0.88"}
BOX = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()
box = {cn(n): BOX_KNOWN.get(cn(n)) for n in BOX}
# Pins of torch 2.13.0 left unmet on purpose (docs/gpu.md, "CUDA libraries"):
ACCEPTED = {
    ("torch", "nvidia-nccl-cu13"): "2.29.7 is not on the index; 2.32.3 carried (>= 2.29.7 needed: ncclCommResume)",
    ("torch", "nvidia-cusparselt-cu13"): "box 0.8.0 exports all 16 cusparseLt symbols torch 2.13 links",
    ("torch", "cuda-toolkit"): "box 13.0.2 (cuBLAS 13.1.0.3): same CUDA 13.0 runtime, minor-version compatible",
}

wheels = {}
for f in sorted(os.listdir(dest)):
    if not f.endswith(".whl"):
        continue
    n, v = f.split("-")[:2]
    key = cn(n)
    if key not in pinned or pinned[key][0] != v:
        os.remove(os.path.join(dest, f)); print("removed (not in list):", f); continue
    wheels[key] = f
lost = sorted(set(pinned) - set(wheels))
if lost:
    sys.exit(f"gpu_wheels: missing wheels for {lost}")

env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
       "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "platform_release": "", "platform_version": "", "implementation_version": "3.12.3", "extra": ""}
# After install: every [replace]/[add] wheel, box packages, [if-needed] wheels
# where the box's version fails (gpu_install.sh decides that on the box).
errors, optional, unknown = [], {}, {}
for key, f in sorted(wheels.items()):
    with zipfile.ZipFile(os.path.join(dest, f)) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for r in re.findall(r"^Requires-Dist: (.*)$", meta, re.M):
        req = Requirement(r)
        if req.marker and not req.marker.evaluate(env):
            continue
        rn = cn(req.name)
        if (key, rn) in ACCEPTED:
            print(f"accepted: {key} wants {rn}{req.specifier}: {ACCEPTED[(key, rn)]}")
            continue
        if rn in wheels:
            v = pinned[rn][0]
            if pinned[rn][1] == "if-needed" and rn in box and box[rn] and Version(box[rn]) in req.specifier:
                v = box[rn]  # the box's own version stays
            if not req.specifier.contains(v, prereleases=True):
                errors.append(f"{key} needs {req}, set has {rn} {v}")
        elif rn in box:
            bv = box[rn]
            if bv is None:
                if str(req.specifier):
                    unknown.setdefault(rn, []).append(f"{key}: {req.specifier}")
            elif not req.specifier.contains(bv, prereleases=True):
                errors.append(f"{key} needs {req}, box has {rn} {bv}")
        elif rn in skipped:
            optional.setdefault(rn, []).append(key)
        else:
            errors.append(f"{key} needs {req}: not in the set, not on the box, not skipped")

tot = 0
print(f"\n{'MB':>8}  section     wheel")
for key, f in sorted(wheels.items(), key=lambda kv: -os.path.getsize(os.path.join(dest, kv[1]))):
    sz = os.path.getsize(os.path.join(dest, f)); tot += sz
    print(f"{sz/1e6:8.1f}  {pinned[key][1]:<10}  {f}")
print(f"{tot/1e6:8.1f}  TOTAL ({len(wheels)} wheels, {tot/2**20:.0f} MiB)")
print("\nskipped on purpose (optional, imported lazily by vLLM; see docs/gpu.md):")
for rn, who in sorted(optional.items()):
    print(f"  {rn} {skipped[rn]}  <- {', '.join(who)}")
print("\nbox packages of unknown version with a constraint (the box's pip check reports any miss):")
for rn, who in sorted(unknown.items()):
    print(f"  {rn}: {'; '.join(who)}")
if errors:
    print("\nNOT CLOSED:"); [print("  " + e) for e in errors]
    sys.exit(1)
print("\nclosure: OK (every requirement met by the set, the box, or a skipped optional package)")
EOF
