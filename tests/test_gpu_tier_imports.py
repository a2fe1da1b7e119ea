"""The GPU tier and the benchmarks run only where a GPU is lent, so a moved module breaks them unseen
(2026-12-02: tests/gpu/test_glm_image_ar_gpu.py still imported `vllm_omni_plugin.models.glm_image_prompt`
after the family move and failed on the H200 before comparing anything). This checks, on CPU, that every
`from vllm_omni_plugin... import name` in tests/gpu/ and benchmarks/ -- function-local ones included --
names a module that imports and a name it has."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("tests/gpu/*.py"), *ROOT.glob("benchmarks/*.py")])


def _imports(path: Path) -> list[tuple[int, str, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "vllm_omni_plugin":
            out += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, "") for alias in node.names
                    if alias.name.split(".")[0] == "vllm_omni_plugin"]
    return out


def test_the_check_sees_function_local_imports():
    found = _imports(ROOT / "tests/gpu/test_glm_image_ar_gpu.py")
    assert any(module.endswith("prompt") and name == "target_grids" for _, module, name in found), found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_resolve(path: Path):
    missing = []
    for line, module, name in _imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{path.name}:{line}: {module} ({exc})")
            continue
        if name and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
