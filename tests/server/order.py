"""The order of the server test files: each `omni_server` configuration starts as few times as possible.

`omni_server` keeps one server alive (2 cores, 24 GB) and restarts it whenever a test asks for
another configuration ("family" or "family:variant"). In pytest's alphabetical file order the
qwen-image server alone started ten times a session (~30-60 s each on the CI box). The keys a
test asks for are read from its source (the literal `omni_server("family", variant=...)` calls
in its body and in the module's own fixtures it uses), and the files are chained so that the next
file starts with the server the previous one ended with. Tests keep their order inside a file
(some depend on it: a server stopped or killed by one test, a job store read after a restart).
"""

from __future__ import annotations

import ast
from pathlib import Path


def _call_key(node: ast.Call) -> str | None:
    """The `omni_server` key of a literal `omni_server("family", variant="v", ...)` call, else None."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "omni_server" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return None
    variant = next((kw.value.value for kw in node.keywords if kw.arg == "variant" and isinstance(kw.value, ast.Constant)),
                   "")
    return f"{node.args[0].value}:{variant}" if variant else node.args[0].value


def function_keys(path: Path) -> dict[str, list[str]]:
    """{top-level function of the file: the omni_server keys it asks for, in source order}."""
    out = {}
    for fn in ast.parse(path.read_text()).body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = sorted((n.lineno, n.col_offset, key) for n in ast.walk(fn) if isinstance(n, ast.Call)
                           for key in [_call_key(n)] if key is not None)
            out[fn.name] = [key for _, _, key in calls]
    return out


def module_servers(items, keys: dict[str, list[str]]) -> list[str]:
    """The servers one file's tests ask for, in test order, repeats of the running one dropped."""
    out: list[str] = []
    for item in items:
        name = getattr(item, "originalname", item.name)
        asked = [k for f in getattr(item, "fixturenames", ()) if f != name for k in keys.get(f, ())]
        for key in [*asked, *keys.get(name, ())]:
            if not out or out[-1] != key:
                out.append(key)
    return out


def chain(servers: dict[str, list[str]]) -> list[str]:
    """Module names in run order: those that use no shared server first (some start their own, with
    none of ours alive), then greedily the file that starts with the server now running -- files
    that stay on it before files that move on (a file that moves on, or kills its server, ends a
    run), and among those the one whose last server the most remaining files start with. When no
    file starts with the running server, a new run starts with a server no remaining file moves on to."""
    order = sorted(m for m, s in servers.items() if not s)
    rest = sorted(m for m, s in servers.items() if s)
    current = None
    while rest:
        def rank(m: str):
            s = servers[m]
            led_to = s[0] != current and any(servers[o][0] != s[0] == servers[o][-1] for o in rest)
            followers = sum(1 for o in rest if o != m and servers[o][0] == s[-1])
            return s[0] != current, led_to, len(set(s)) > 1, -followers, m

        pick = min(rest, key=rank)
        rest.remove(pick)
        order.append(pick)
        current = servers[pick][-1]
    return order


def reorder(items: list, folder: Path) -> None:
    """Reorder, in place, the contiguous run of `items` from test files directly in `folder`."""
    at = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == folder]
    if not at or at != list(range(at[0], at[-1] + 1)):
        return  # (not one contiguous run: some other plugin ordered them; leave it)
    by_module: dict[str, list] = {}
    for item in items[at[0]:at[-1] + 1]:
        by_module.setdefault(str(item.fspath), []).append(item)
    servers = {m: module_servers(its, function_keys(Path(m))) for m, its in by_module.items()}
    items[at[0]:at[-1] + 1] = [item for m in chain(servers) for item in by_module[m]]
