"""Per-request LoRA adapters that still batch (docs/server.md "LoRA adapters").

An adapter is read the way diffusers reads it for `pipeline.load_lora_weights`: the
pipeline class's own `lora_state_dict` (which converts kohya / other layouts to the
diffusers one), diffusers' peft-format conversion and its `LoraConfig` inference (rank
and alpha per module, or the metadata `save_lora_weights` wrote). Which component the
adapter targets comes from the pipeline class's metadata (`transformer_name`).

The weights are never merged. Each target `nn.Linear` of the component carries a
forward hook that adds, for the rows of the current forward that use an adapter,

    y[rows] += B((w_req * alpha / r) * A(x[rows]))

with rows grouped by (adapter, weight): one gathered pair of low-rank matmuls per group
(index_select + index_add, S-LoRA / Punica style, in plain torch ops); peft's `Linear.forward`
computes the same sum with the scale applied after B (a rounding apart). Which rows use which adapter
is set by the step-wise pipeline around each model forward (`rows`); the CFG rows of a
request use its adapters, as the diffusers pipeline does. Rows without an adapter get
exactly the base layer's output.

This module imports no vLLM; it names no family.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .capabilities import InvalidParams

#: default largest adapter file read (bytes); EngineLoraConfig.max_bytes
DEFAULT_MAX_BYTES = 2 << 30
#: what a directory given as an adapter path is searched for (diffusers' then peft's file name)
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


class LoraError(InvalidParams):
    """A refused adapter or adapter request (an OpenAI-format 400 naming `field`)."""


class LoraNotFound(LoraError):
    """A name that is no registered adapter (vLLM answers 404 for an unknown model)."""


class LoraBusy(LoraError):
    """The adapter cannot be loaded or unloaded now (all slots in use, or it is in use)."""


@dataclass(frozen=True)
class LoraPolicy:
    """What the operator allows.

    allowed_dirs  adapter files are read only from under these directories (symlinks resolved)
    max_loras     at most this many adapters resident; the least recently used one that no
                  queued or running request uses is evicted (it reloads from its path when named)
    max_bytes     largest adapter file read
    """

    allowed_dirs: tuple[str, ...] = ()
    max_loras: int = 4
    max_bytes: int = DEFAULT_MAX_BYTES


def check_path(path: str, policy: LoraPolicy, extra_allowed: Sequence[str] = (), field_name: str = "lora_path") -> Path:
    """The real file an adapter path names, if the policy lets it be read; else LoraError naming the rule.

    Nothing is read before every rule passed: inside an allowed directory once symlinks are
    resolved, a `.safetensors` regular file, at most `max_bytes` (a directory: diffusers' or
    peft's weight file name in it).
    """
    if not isinstance(path, str) or not path:
        raise LoraError("the adapter path must be a non-empty string", field_name)
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(d)) for d in (*policy.allowed_dirs, *extra_allowed)]
    if not any(real == r or r in real.parents for r in roots):
        raise LoraError(
            f"adapter path {path!r} is outside the directories allowed by --omni-lora-dirs"
            + (" (a symlink there leads out)" if real != Path(os.path.abspath(path)) else ""), field_name)
    if real.is_dir():
        found = [real / n for n in WEIGHT_NAMES if (real / n).is_file()]
        if not found:
            raise LoraError(f"adapter directory {path!r} has none of {', '.join(WEIGHT_NAMES)}", field_name)
        return check_path(str(found[0]), policy, extra_allowed, field_name)
    if real.suffix != ".safetensors":
        raise LoraError(f"adapter path {path!r} is not a .safetensors file (only safetensors adapters are read)",
                        field_name)
    if not real.is_file():
        raise LoraError(f"adapter path {path!r} does not exist", field_name)
    size = real.stat().st_size
    if size > policy.max_bytes:
        raise LoraError(f"adapter file {path!r} is {size} bytes, over the limit of {policy.max_bytes} bytes",
                        field_name)
    return real


@dataclass
class _Module:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    alpha: float
    r: int
    rslora: bool

    def scaling(self, weight: float) -> float:
        """peft's `set_scale`: weight * alpha / r (rslora: / sqrt(r)), in its order of operations."""
        return weight * self.alpha / math.sqrt(self.r) if self.rslora else weight * self.alpha / self.r


@dataclass
class Adapter:
    name: str
    path: str
    modules: dict[str, _Module]
    nbytes: int

    @property
    def rank(self) -> int:
        return max(m.r for m in self.modules.values())


def read_adapter(pipe: Any, component: torch.nn.Module, prefix: str, name: str, path: Path) -> Adapter:
    """Read one adapter file as diffusers' `load_lora_weights` reads it; check it fits `component`."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft.utils.other import get_pattern_key

    try:
        state_dict, metadata = type(pipe).lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # noqa: BLE001 -- an unreadable / foreign file is the caller's bad input
        raise LoraError(f"adapter {name!r}: {path.name} is not a LoRA file diffusers reads ({exc})", "lora_path") from exc
    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or None
    if not state_dict:
        raise LoraError(f"adapter {name!r} has no weights for the model's {prefix}", "lora_path")
    if any(".lokr_" in k for k in state_dict):
        raise LoraError(f"adapter {name!r} is a LoKr adapter; only LoRA is served", "lora_path")
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(state_dict, None, metadata, rank, model_state_dict=component.state_dict(),
                                 adapter_name=name)
    if config.use_dora:
        raise LoraError(f"adapter {name!r} is a DoRA adapter; only plain LoRA is served", "lora_path")
    unknown = sorted({k for k in state_dict if not (".lora_A." in k or ".lora_B." in k)})
    if unknown:
        raise LoraError(f"adapter {name!r} has weights that are not LoRA A/B matrices: {unknown[0]}", "lora_path")
    linears = dict(component.named_modules())
    weight = next(component.parameters())
    modules: dict[str, _Module] = {}
    nbytes = 0
    for key in sorted(k for k in state_dict if ".lora_A." in k):
        mod_name = key.split(".lora_A.")[0]
        a, b = state_dict[key], state_dict.get(f"{mod_name}.lora_B.weight")
        if b is None:
            raise LoraError(f"adapter {name!r}: {mod_name} has lora_A but no lora_B", "lora_path")
        base = linears.get(mod_name)
        if base is None:
            raise LoraError(f"adapter {name!r} targets {mod_name!r}, which the base model's {prefix} does not have",
                            "lora_path")
        if not isinstance(base, torch.nn.Linear):
            raise LoraError(f"adapter {name!r} targets {mod_name!r}, a {type(base).__name__}; only Linear layers "
                            "are served", "lora_path")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base.in_features or b.shape[0] != base.out_features \
                or a.shape[0] != b.shape[1]:
            raise LoraError(
                f"adapter {name!r}: {mod_name} has A {tuple(a.shape)} / B {tuple(b.shape)}, which do not fit the base "
                f"layer ({base.in_features} -> {base.out_features})", "lora_path")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), mod_name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), mod_name), config.lora_alpha)
        if r != a.shape[0]:
            raise LoraError(f"adapter {name!r}: {mod_name} has rank {a.shape[0]} but its config says {r}", "lora_path")
        modules[mod_name] = _Module(a.to(weight.device, weight.dtype).contiguous(),
                                    b.to(weight.device, weight.dtype).contiguous(), alpha, r, bool(config.use_rslora))
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return Adapter(name, str(path), modules, nbytes)


# ---- the rows of the current forward -------------------------------------------------------------
@dataclass
class _Group:
    adapter: Adapter
    weight: float
    index: torch.Tensor | None  # rows of the forward (None: every row)


@dataclass
class _Slot:
    """The k-th adapter of every row (Punica-style): row i uses adapters[row_index[i] - 1], 0 = none."""

    adapters: tuple[Adapter, ...]
    row_index: torch.Tensor  # [rows] long
    weights: torch.Tensor  # [rows] the request's scale (0 where none)


@dataclass
class _Plan:
    rows: int
    #: one (adapter, weight) group: its rows gathered (or all rows, no gather)
    groups: list[_Group]
    #: two or more groups: per-row adapters, one batched matmul pair per slot over all rows
    slots: list[_Slot] | None = None


_active = threading.local()

RowAdapters = Sequence[tuple[str, float]]  # a request's (adapter name, weight) pairs


class LoraSet:
    """The adapters one pipeline serves: registered names, resident weights (LRU), use counts."""

    def __init__(self, pipe: Any, policy: LoraPolicy) -> None:
        prefix = getattr(type(pipe), "transformer_name", None)
        if not hasattr(type(pipe), "lora_state_dict") or prefix is None:
            raise ValueError(f"{type(pipe).__name__} loads no LoRA adapters in diffusers")
        self.pipe, self.policy, self.prefix = pipe, policy, prefix
        self.component: torch.nn.Module = getattr(pipe, prefix)
        self._lock = threading.RLock()
        self._paths: dict[str, str] = {}  # registered name -> path (resident or not)
        self._resident: OrderedDict[str, Adapter] = OrderedDict()  # LRU order, oldest first
        self._in_use: dict[str, int] = {}
        self._allowed_files: set[str] = set()  # --omni-lora paths count as allowed
        self.loads = 0
        #: per (layer, adapters of a slot): their stacked A / B (see _stacked); cleared when adapters change
        self._stacks: dict[tuple, tuple[torch.Tensor, ...] | None] = {}
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in self.component.named_modules()
                       if isinstance(m, torch.nn.Linear)]

    # ---- registry --------------------------------------------------------------------
    def register(self, name: str, path: str, operator: bool = False) -> Adapter:
        """Check, read and register an adapter (operator=True: a start-up --omni-lora path, allowed as such)."""
        if not isinstance(name, str) or not name:
            raise LoraError("the adapter name must be a non-empty string", "lora_name")
        with self._lock:
            if name in self._paths:
                raise LoraError(f"LoRA adapter {name!r} is already loaded; unload it first", "lora_name")
            if operator:
                self._allowed_files.add(os.path.realpath(path))
            real = self._check(path)
            adapter = self._read(name, real)
            self._paths[name] = str(real)
            return adapter

    def unregister(self, name: str) -> None:
        """Forget an adapter; refused while a queued or running request uses it."""
        with self._lock:
            if name not in self._paths:
                raise LoraNotFound(f"LoRA adapter {name!r} is not loaded", "lora_name")
            if self._in_use.get(name):
                raise LoraBusy(f"LoRA adapter {name!r} is in use by {self._in_use[name]} queued or running "
                               "request(s); unload it after they finish", "lora_name")
            del self._paths[name]
            self._resident.pop(name, None)
            self._stacks.clear()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": n, "path": p, "resident": n in self._resident} for n, p in self._paths.items()]

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def _check(self, path: str) -> Path:
        return check_path(path, self.policy, sorted(self._allowed_files))

    def _read(self, name: str, real: Path) -> Adapter:
        """Make room (evict the LRU unused adapter), read, make resident."""
        while len(self._resident) >= self.policy.max_loras:
            idle = next((n for n in self._resident if not self._in_use.get(n)), None)
            if idle is None:
                raise LoraBusy(f"all {self.policy.max_loras} adapter slots (--omni-max-loras) are used by running "
                               f"requests; {name!r} cannot be loaded now", "lora")
            del self._resident[idle]
            self._stacks.clear()
        adapter = read_adapter(self.pipe, self.component, self.prefix, name, real)
        self._resident[name] = adapter
        self.loads += 1
        return adapter

    # ---- requests ----------------------------------------------------------------------
    def check(self, lora: RowAdapters) -> None:
        """Refuse unknown names (LoraNotFound) and bad weights before a request is queued."""
        for name, weight in lora:
            if name not in self._paths:
                raise LoraNotFound(f"unknown LoRA adapter {name!r} (loaded: {', '.join(self.names()) or 'none'})",
                                   "lora")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
                raise LoraError(f"LoRA scale of {name!r} must be a number, got {weight!r}", "lora")

    def acquire(self, lora: RowAdapters) -> None:
        """Pin a request's adapters (reloading evicted ones) until `release`."""
        with self._lock:
            self.check(lora)
            taken: list[str] = []
            try:
                for name, _ in lora:
                    if name not in self._resident:
                        self._read(name, self._check(self._paths[name]))
                    self._resident.move_to_end(name)
                    self._in_use[name] = self._in_use.get(name, 0) + 1
                    taken.append(name)
            except Exception:
                self.release([(n, 1.0) for n in taken])
                raise

    def release(self, lora: RowAdapters) -> None:
        with self._lock:
            for name, _ in lora:
                left = self._in_use.get(name, 0) - 1
                if left > 0:
                    self._in_use[name] = left
                else:
                    self._in_use.pop(name, None)

    # ---- forwards ----------------------------------------------------------------------
    @contextmanager
    def rows(self, per_block: Sequence[tuple[RowAdapters | None, int]]) -> Iterator[None]:
        """Set which rows of the next forward(s) use which adapters: (adapters, row count) per block, in order."""
        if not any(lora for lora, _ in per_block):
            yield
            return
        total = sum(n for _, n in per_block)
        members: dict[tuple[str, float], list[int]] = {}
        start = 0
        for lora, n in per_block:
            for name, weight in lora or ():
                members.setdefault((name, float(weight)), []).extend(range(start, start + n))
            start += n
        device = next(self.component.parameters()).device
        members = {k: v for k, v in members.items() if k[1] != 0}
        with self._lock:
            if len(members) <= 1:
                plan = _Plan(total, [_Group(self._resident[name], weight, None if len(idx) == total else
                                            torch.tensor(idx, dtype=torch.long, device=device))
                                     for (name, weight), idx in members.items()])
            else:
                plan = _Plan(total, [], self._slots(per_block, total, device))
        previous = getattr(_active, "plan", None)
        _active.plan = plan
        try:
            yield
        finally:
            _active.plan = previous

    def _slots(self, per_block: Sequence[tuple[RowAdapters | None, int]], total: int,
               device: torch.device) -> list[_Slot]:
        """Per slot k (the k-th adapter a request names), each row's adapter and weight."""
        slots = []
        for k in range(max(len(lora or ()) for lora, _ in per_block)):
            names = list(dict.fromkeys(lora[k][0] for lora, _ in per_block if lora and len(lora) > k))
            index, weights = [], []
            for lora, n in per_block:
                has = bool(lora) and len(lora) > k
                index += [names.index(lora[k][0]) + 1 if has else 0] * n
                weights += [float(lora[k][1]) if has else 0.0] * n
            dtype = next(self.component.parameters()).dtype
            slots.append(_Slot(tuple(self._resident[n] for n in names),
                               torch.tensor(index, dtype=torch.long, device=device),
                               torch.tensor(weights, dtype=dtype, device=device)))
        return slots

    def _stacked(self, module_name: str, adapters: tuple[Adapter, ...]) -> tuple[torch.Tensor, ...] | None:
        """(A [n+1, r, in], B [n+1, out, r], alpha/r [n+1]) of one layer for these adapters, zero-padded to the
        largest rank, slot 0 all zeros (rows without an adapter); None where none of them targets the layer."""
        key = (module_name, tuple(id(a) for a in adapters))
        hit = self._stacks.get(key)
        if hit is not None or key in self._stacks:
            return hit
        mods = [a.modules.get(module_name) for a in adapters]
        present = [m for m in mods if m is not None]
        if not present:
            self._stacks[key] = None
            return None
        r = max(m.r for m in present)
        ref = present[0]
        A = ref.A.new_zeros(len(mods) + 1, r, ref.A.shape[1])
        B = ref.B.new_zeros(len(mods) + 1, ref.B.shape[0], r)
        scale = ref.A.new_zeros(len(mods) + 1)
        for i, m in enumerate(mods, 1):
            if m is not None:
                A[i, : m.r], B[i, :, : m.r], scale[i] = m.A, m.B, m.scaling(1.0)
        self._stacks[key] = (A, B, scale)
        return A, B, scale

    def _hook(self, module_name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            plan = getattr(_active, "plan", None)
            if plan is None:
                return None
            x = args[0]

            def check_rows() -> None:  # (a targeted layer whose input is not one row per batch row)
                if x.shape[0] != plan.rows:
                    raise RuntimeError(f"LoRA on {module_name}: input has {x.shape[0]} rows, the forward {plan.rows}")

            for slot in plan.slots or ():
                stacked = self._stacked(module_name, slot.adapters)
                if stacked is None:
                    continue
                check_rows()
                A, B, scale = stacked
                idx = slot.row_index
                h = torch.bmm(x.reshape(plan.rows, -1, x.shape[-1]).to(A.dtype), A.index_select(0, idx).transpose(1, 2))
                h = h * (scale.index_select(0, idx) * slot.weights).view(-1, 1, 1)
                delta = torch.bmm(h, B.index_select(0, idx).transpose(1, 2))
                out = out + delta.view(out.shape).to(out.dtype)
            for g in plan.groups:
                m = g.adapter.modules.get(module_name)
                if m is None:
                    continue
                check_rows()
                scaling = m.scaling(g.weight)
                # the scale goes on the rank-r intermediate (r columns, not out_features), and the
                # up-projection adds into the output in place: two passes over the activations
                if g.index is None:
                    h = F.linear(x.to(m.A.dtype), m.A) * scaling
                    if out.is_contiguous() and out.dtype == m.B.dtype:
                        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), m.B.t())
                    else:
                        out = out + F.linear(h, m.B).to(out.dtype)
                else:
                    h = F.linear(x.index_select(0, g.index).to(m.A.dtype), m.A) * scaling
                    out = out.index_add_(0, g.index, F.linear(h, m.B).to(out.dtype))
            return out

        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def normalise_request(lora: Any) -> tuple[tuple[str, float], ...] | None:
    """A request's `lora` value -> ((name, scale), ...); accepts (name, scale) pairs or {"name", "scale"} maps."""
    if lora is None:
        return None
    if not isinstance(lora, (list, tuple)):
        raise LoraError(f"lora must be a list of {{name, scale}}, got {type(lora).__name__}", "lora")
    out: list[tuple[str, float]] = []
    for item in lora:
        if isinstance(item, Mapping):
            name, scale = item.get("name"), item.get("scale", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, scale = item
        else:
            raise LoraError(f"lora entries are {{name, scale}}, got {item!r}", "lora")
        if not isinstance(name, str) or not name:
            raise LoraError(f"a lora entry's name must be a non-empty string, got {name!r}", "lora")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale:
            raise LoraError(f"LoRA scale of {name!r} must be a number, got {scale!r}", "lora")
        if any(n == name for n, _ in out):
            raise LoraError(f"lora names {name!r} twice", "lora")
        out.append((name, float(scale)))
    return tuple(out) or None


__all__ = ["Adapter", "LoraBusy", "LoraError", "LoraNotFound", "LoraPolicy", "LoraSet", "check_path",
           "normalise_request", "read_adapter"]
