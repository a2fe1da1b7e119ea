"""Declared patches of upstream vLLM symbols (`vllm_omni_plugin.patches`).

Every change this plugin makes to vLLM's own code lives here, one module per
patch, and nowhere else. Each module exports `PATCH`, a `Patch` that declares:

  target     the upstream symbol, as "module:Qualified.name"
  why        the behaviour we need and vLLM lacks
  how        what the replacement does (it delegates to the original wherever
             it can)
  upstream   whether upstream has, or could take, the fix
  checked    the vLLM versions the patch was verified against
  signature  the upstream signature we rely on; a mismatch refuses the patch
  requires   other upstream symbols the replacement calls, checked the same way
  platforms  the vLLM platforms (`current_platform.device_type`) whose behaviour
             it fixes; empty = all. Elsewhere it is neither verified nor
             applied, and doctor reports it "not applicable" with the reason,
             so a CPU-only fix never touches CUDA behaviour.

Applying is idempotent (vLLM loads general plugins in every process it starts,
sometimes twice in one), and a target that moved or changed shape fails with a
`PatchError` naming the patch and the installed vLLM version. `vllm-omni doctor`
lists every patch and whether it applied.

Adding a patch: write `patches/<name>.py` with a `PATCH`, append the module
name to `PATCH_MODULES`, and add a test in both directions (what changes for
omni models, what stays unchanged for everyone else).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal

PATCH_MODULES: tuple[str, ...] = (
    "is_mm_prefix_lm",
    "cpu_mm_prefix_metadata",
    "cpu_mm_prefix_attention",
    "cpu_mm_prefix_no_chunking",
    "cpu_attn_known_kv_layout",
)

# Marks a replacement installed by us, so a second apply is recognised; the
# upstream attribute it replaced stays reachable for delegation and tests.
_MARK = "__vllm_omni_patch__"
ORIGINAL = "__vllm_omni_original__"
_lock = threading.Lock()


class PatchError(RuntimeError):
    """An upstream symbol a patch needs is missing or has an unexpected shape."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str
    why: str
    how: str
    upstream: str
    checked: tuple[str, ...]
    signature: str
    requires: tuple[str, ...]
    # original upstream attribute -> replacement attribute
    make_replacement: Callable[[Any], Any]
    platforms: tuple[str, ...] = ()

    def not_applicable_reason(self) -> str | None:
        """Why this patch has nothing to do on the running platform, or None if it applies."""
        if not self.platforms:
            return None
        device = _device_type()
        if device in self.platforms:
            return None
        return f"only for platform {', '.join(self.platforms)}; this process runs on {device}"

    def resolve(self, target: str | None = None) -> tuple[Any, str, Any]:
        """Return (owner, attribute name, current attribute) of the target."""
        module_name, _, qualname = (target or self.target).partition(":")
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise self.error(f"cannot import {module_name}: {e}") from e
        *path, attr = qualname.split(".")
        for part in path:
            if not hasattr(owner, part):
                raise self.error(f"{module_name} has no {part!r}")
            owner = getattr(owner, part)
        if attr not in vars(owner):
            raise self.error(f"{owner!r} has no attribute {attr!r}")
        return owner, attr, vars(owner)[attr]

    def error(self, detail: str) -> PatchError:
        return PatchError(
            f"vllm-omni-plugin patch {self.name!r} ({self.target}) cannot apply to "
            f"vLLM {_vllm_version()}: {detail}. Checked against vLLM {', '.join(self.checked)}; "
            f"the upstream symbol moved or changed, so this patch needs updating."
        )


@dataclass(frozen=True)
class PatchResult:
    name: str
    target: str
    status: Literal["applied", "already applied", "not applied", "not applicable", "failed"]
    detail: str = ""


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception as e:  # noqa: BLE001 -- vLLM missing or broken: say so instead of hiding it
        return f"<unavailable: {e}>"


def _device_type() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def _signature_of(attr: Any) -> str:
    func = attr.func if hasattr(attr, "func") else attr  # cached_property/partial
    func = getattr(func, "fget", func)  # property
    return str(inspect.signature(func))


def _apply(patch: Patch) -> PatchResult:
    if (reason := patch.not_applicable_reason()) is not None:
        return PatchResult(patch.name, patch.target, "not applicable", reason)
    owner, name, current = patch.resolve()
    if getattr(current, _MARK, None) == patch.name:
        return PatchResult(patch.name, patch.target, "already applied")
    found = _signature_of(current)
    if found != patch.signature:
        raise patch.error(f"expected signature {patch.signature}, found {found}")
    for required in patch.requires:
        patch.resolve(required)
    replacement = patch.make_replacement(current)
    setattr(replacement, _MARK, patch.name)
    setattr(replacement, ORIGINAL, current)
    setattr(owner, name, replacement)
    if hasattr(replacement, "__set_name__"):  # descriptors such as cached_property
        replacement.__set_name__(owner, name)
    return PatchResult(patch.name, patch.target, "applied")


def all_patches() -> list[Patch]:
    return [importlib.import_module(f"{__name__}.{m}").PATCH for m in PATCH_MODULES]


def apply_all(*, raise_on_failure: bool = True) -> list[PatchResult]:
    """Apply every declared patch once; safe to call any number of times."""
    results = []
    with _lock:
        for patch in all_patches():
            try:
                results.append(_apply(patch))
            except PatchError as e:
                if raise_on_failure:
                    raise
                results.append(PatchResult(patch.name, patch.target, "failed", str(e)))
    return results


def status() -> list[PatchResult]:
    """Whether each patch is in place in this process, without applying anything."""
    results = []
    for patch in all_patches():
        if (reason := patch.not_applicable_reason()) is not None:
            results.append(PatchResult(patch.name, patch.target, "not applicable", reason))
            continue
        try:
            _, _, current = patch.resolve()
        except PatchError as e:
            results.append(PatchResult(patch.name, patch.target, "failed", str(e)))
            continue
        applied = getattr(current, _MARK, None) == patch.name
        results.append(PatchResult(patch.name, patch.target, "applied" if applied else "not applied"))
    return results
