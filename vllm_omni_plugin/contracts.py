"""What this plugin relies on in vLLM, checked against whichever vLLM is importable.

`vllm-omni doctor --contracts` runs these checks in-process; CI runs them a second time against
vLLM 0.33.0's source (scripts/check_vllm_contracts.sh: the CUDA wheel's Python files unpacked
beside the CPU torch, nothing installed, no engine started). Each check says how it was verified:

  import  the module imported and the object was inspected (signatures compared exactly)
  source  the module does not import here (a dependency of that vLLM is missing, or it needs a
          GPU): its source file was parsed instead (names and parameter names compared)

The contracts:

  patch       every declared patch: the target exists with the declared signature, and every
              symbol it `requires` exists (patches/__init__.py)
  import      every `from vllm... import name` / `import vllm...` in this package resolves
  model       every model class the plugin registers with vLLM imports and builds its class
  connector   every KVConnectorBase_V1 method OmniKVConnector overrides exists in vLLM's base
              with the same parameter names
  entrypoint  the entry point groups pyproject.toml registers in are groups vLLM loads
  endpoint    vLLM's EndpointPlugin protocol still has the members OmniEndpointPlugin implements
              (name, required_tasks, attach_router(app), init_state(engine_client, state, args))
  hook        vLLM's CLI hands `--omni` to the `vllm_omni` package (`maybe_run_omni`)

Symbols that moved between supported versions are declared in vllm_moves.py (one lookup); the
import contract checks that one of each one's declared places has it.

`VERIFIED` declares per vLLM version what was verified; doctor prints the line of the installed one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

#: vLLM version -> what was verified on it (doctor prints the installed version's line)
VERIFIED: dict[str, str] = {
    "0.32.0": "full: the test suite on the CPU build (real engine and server), the GPU tier on the CUDA build, "
              "and these contract checks",
    "0.33.0": "contracts only: patch signatures, vLLM imports, model classes, KV-connector methods, entry point "
              "groups and endpoint-plugin hooks checked against its source (CI: scripts/check_vllm_contracts.sh); "
              "no engine was started on it",
}

PLUGIN_ROOT = Path(__file__).resolve().parent
ENTRY_POINT_GROUPS = ("vllm.general_plugins", "vllm.endpoint_plugins")
ENDPOINT_MEMBERS = {"attach_router": ["self", "app"], "init_state": ["self", "engine_client", "state", "args"]}


@dataclass
class Contract:
    kind: str
    name: str
    ok: bool
    how: str  # "import" | "source"
    detail: str = ""


def verified_for(version: str) -> str:
    """What was verified on vLLM `version` (a line for doctor)."""
    return VERIFIED.get(version, f"nothing: vLLM {version} is outside the versions checked ({', '.join(VERIFIED)})")


# ---- reading vLLM's source when a module does not import ------------------------------------
def _vllm_root() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not importable here")
    return Path(list(spec.submodule_search_locations)[0])


def _module_file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    root = _vllm_root()
    for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def _source_names(module: str) -> dict[str, ast.AST] | None:
    """Top-level names a vLLM module's source defines (def, class, assignment, import), or None."""
    path = _module_file(module)
    if path is None:
        return None
    names: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def _source_lookup(target: str) -> ast.AST | None:
    """The AST node of "module:Qual.name" in vLLM's source, or None where it is not defined."""
    module, _, qualname = target.partition(":")
    names = _source_names(module)
    if names is None:
        return None
    node: ast.AST | None = names.get(qualname.split(".")[0])
    for part in qualname.split(".")[1:]:
        if not isinstance(node, ast.ClassDef):
            return None
        node = next((n for n in node.body if getattr(n, "name", None) == part
                     or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == part)
                     or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == part for t in n.targets))),
                    None)
    return node


def _ast_params(node: ast.AST) -> list[str] | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs]
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return names


def _sig_params(signature: str) -> list[str]:
    """Parameter names of a signature string "(self, a: T = 1, *, b) -> R" (top-level commas only)."""
    body = signature[1:signature.rindex(")")] if ")" in signature else signature
    depth, part, parts = 0, "", []
    for ch in body:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    parts.append(part)
    names = []
    for p in (p.strip() for p in parts):
        if p and p not in ("*", "/"):
            names.append(re.match(r"(\*{0,2}\w+)", p).group(1))
    return names


def _inspect_params(obj: Any) -> list[str]:
    out = []
    for p in inspect.signature(obj).parameters.values():
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        out.append(prefix + p.name)
    return out


def _importable(module: str) -> tuple[Any | None, str]:
    try:
        return importlib.import_module(module), ""
    except ImportError as e:  # a dependency of that vLLM, or a GPU library, missing here
        return None, f"{type(e).__name__}: {e}"


_MISSING = object()


def _resolve(target: str) -> tuple[Any, str]:
    """(the object at "module:Qual.name", or _MISSING and why not) by import."""
    module, _, qualname = target.partition(":")
    obj, why = _importable(module)
    if obj is None:
        return _MISSING, why
    for part in qualname.split(".") if qualname else []:
        if not hasattr(obj, part):
            return _MISSING, f"no attribute {part!r}"
        obj = getattr(obj, part)
    return obj, ""


# ---- the checks ------------------------------------------------------------------------------
def _check_symbol(kind: str, target: str) -> Contract:
    module = target.partition(":")[0]
    mod, why = _importable(module)
    if mod is not None:
        obj, missing = _resolve(target)
        return Contract(kind, target, obj is not _MISSING, "import", missing)
    found = _source_lookup(target) if ":" in target and target.partition(":")[2] else _module_file(module)
    if found is None and ":" in target:  # a submodule imported by name (from vllm.x import y)
        found = _module_file(target.replace(":", "."))
    return Contract(kind, target, found is not None, "source", "" if found is not None else f"not in the source ({why})")


def check_patches() -> Iterator[Contract]:
    from vllm_omni_plugin.patches import ORIGINAL, _signature_of, all_patches

    for patch in all_patches():
        obj, why = _resolve(patch.target)
        if obj is not _MISSING or not why.startswith(("ModuleNotFoundError", "ImportError")):
            current = None
            if obj is not _MISSING:
                owner_mod, _, qual = patch.target.partition(":")
                owner, _ = _resolve(f"{owner_mod}:{qual.rpartition('.')[0]}") if "." in qual else _resolve(owner_mod)
                current = vars(owner).get(qual.rpartition(".")[2], obj)  # the raw attribute (a property, not its value)
                current = getattr(current, ORIGINAL, current)  # vLLM's own, where the patch is applied already
            found = _signature_of(current) if current is not None else None
            ok = found == patch.signature
            yield Contract("patch", f"{patch.name} ({patch.target})", ok, "import",
                           "" if ok else (why or f"signature {found}, declared {patch.signature}"))
        else:
            node = _source_lookup(patch.target)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                ok = _ast_params(node) == _sig_params(patch.signature)
                detail = "" if ok else f"parameters {_ast_params(node)}, declared {_sig_params(patch.signature)}"
            else:
                ok, detail = False, "target not found in the source"
            yield Contract("patch", f"{patch.name} ({patch.target})", ok, "source", detail)
        for required in patch.requires:
            yield _check_symbol("patch", required)


def vllm_imports(root: Path = PLUGIN_ROOT) -> list[str]:
    """Every vLLM symbol this package imports, as "module:name" (or "module:" for `import vllm.x`)."""
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    (node.module == "vllm" or node.module.startswith("vllm.")):
                found.update(f"{node.module}:{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(f"{a.name}:" for a in node.names if a.name == "vllm" or a.name.startswith("vllm."))
    return sorted(found)


def check_imports() -> Iterator[Contract]:
    for target in vllm_imports():
        yield _check_symbol("import", target.rstrip(":"))
    from vllm_omni_plugin.vllm_moves import MOVED

    for name, places in MOVED.items():  # a moved symbol: one of its declared places has it
        found = [_check_symbol("import", f"{module}:{name}") for _, module in places]
        hit = next((c for c in found if c.ok), None)
        yield Contract("import", f"{name} (moved: {', '.join(m for _, m in places)})", hit is not None,
                       hit.how if hit else found[-1].how, f"at {hit.name.partition(':')[0]}" if hit else "in none of them")


def check_omni_hook() -> Iterator[Contract]:
    """`vllm serve ... --omni` reaches us through vLLM's CLI (`maybe_run_omni` imports `vllm_omni`)."""
    target = "vllm.entrypoints.cli.main:maybe_run_omni"
    found = _check_symbol("hook", target)
    path = _module_file("vllm.entrypoints.cli.main")
    names_us = path is not None and "vllm_omni" in path.read_text(encoding="utf-8")
    yield Contract("hook", target, found.ok and names_us, "source",
                   "" if found.ok and names_us else "vLLM's CLI no longer hands --omni to the vllm_omni package")


def check_models() -> Iterator[Contract]:
    from vllm_omni_plugin.model_registry import OMNI_MODELS

    for model in OMNI_MODELS:
        obj, why = _resolve(model.target)
        if obj is not _MISSING:
            yield Contract("model", model.target, isinstance(obj, type), "import")
        else:  # our module needs something this vLLM lacks here: its vLLM imports are checked one by one
            yield Contract("model", model.target, False, "import", why)


def check_connector() -> Iterator[Contract]:
    base_target = "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1"
    ours, why = _resolve("vllm_omni_plugin.kv.connector:OmniKVConnector")
    if ours is _MISSING:
        yield Contract("connector", "OmniKVConnector", False, "import", why)
        return
    base = ours.__mro__[1]
    for name, member in vars(ours).items():
        if not callable(member) or name.startswith("__") and name != "__init__" or not hasattr(base, name):
            continue
        theirs = getattr(base, name)
        ok = _inspect_params(theirs) == _inspect_params(member)
        yield Contract("connector", f"{base_target}.{name}", ok, "import",
                       "" if ok else f"vLLM's {_inspect_params(theirs)}, ours {_inspect_params(member)}")


def check_entry_points() -> Iterator[Contract]:
    strings = set()
    for path in (_vllm_root() / "plugins").rglob("*.py"):
        strings.update(n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(n, ast.Constant) and isinstance(n.value, str))
    for group in ENTRY_POINT_GROUPS:
        yield Contract("entrypoint", group, group in strings, "source",
                       "" if group in strings else "vllm/plugins/ no longer names this group")


def check_endpoint_plugin() -> Iterator[Contract]:
    target = "vllm.plugins.endpoint_plugins.interface:EndpointPlugin"
    proto, why = _resolve(target)
    proto = None if proto is _MISSING else proto
    for member, params in ENDPOINT_MEMBERS.items():
        if proto is not None:
            found = _inspect_params(getattr(proto, member)) if hasattr(proto, member) else None
            how = "import"
        else:
            node = _source_lookup(f"{target}.{member}")
            found, how = (_ast_params(node) if node is not None else None), "source"
        yield Contract("endpoint", f"{target}.{member}", found == params, how,
                       "" if found == params else f"parameters {found}, we implement {params}")
    for attr in ("name", "required_tasks"):
        ok = (hasattr(proto, "__annotations__") and attr in proto.__annotations__) if proto is not None \
            else _source_lookup(f"{target}.{attr}") is not None
        yield Contract("endpoint", f"{target}.{attr}", ok, "import" if proto is not None else "source")


def check_contracts() -> list[Contract]:
    """Every contract against the importable vLLM (see the module docstring)."""
    out: list[Contract] = []
    for check in (check_patches, check_imports, check_models, check_connector, check_entry_points,
                  check_endpoint_plugin, check_omni_hook):
        out.extend(check())
    return out


def report(contracts: list[Contract]) -> dict[str, Any]:
    """JSON of a run: the vLLM version and where it was read, counts, and every contract."""
    import vllm

    return {"vllm": vllm.__version__, "vllm_path": str(_vllm_root()), "verified": verified_for(vllm.__version__),
            "ok": all(c.ok for c in contracts), "checked": len(contracts),
            "by_import": sum(c.how == "import" for c in contracts), "by_source": sum(c.how == "source" for c in contracts),
            "contracts": [asdict(c) for c in contracts]}


def main(argv: list[str] | None = None) -> int:
    """`python -m vllm_omni_plugin.contracts [--json]`: the checks against the importable vLLM, without
    loading plugins or checking the environment (CI runs it on an unpacked vLLM beside another build).

    Returns:
        0 when every contract holds, 1 otherwise.
    """
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m vllm_omni_plugin.contracts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = report(check_contracts())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"vLLM {result['vllm']} ({result['vllm_path']}): {result['checked']} contracts, {result['by_import']} "
              f"by import, {result['by_source']} from source: {'ok' if result['ok'] else 'BROKEN'}")
        print(f"verified on it: {result['verified']}")
        for c in result["contracts"]:
            print(f"  {'ok    ' if c['ok'] else 'BROKEN'} {c['kind']:<10} {c['how']:<6} {c['name']}"
                  + (f" -- {c['detail']}" if c["detail"] else ""))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
