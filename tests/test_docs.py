"""Every fenced block of README.md and docs/*.md is checked against the code, so the docs cannot drift.

* ```bash: every command line names a command that exists with the flags it uses:
  `make` targets in the Makefile; `vllm-omni` subcommands and flags through its
  own parser; `vllm serve ... --omni` flags through the omni serve parser (vLLM's
  + ours); `pip install` extras in pyproject.toml; `python -m` modules importable.
* ```yaml: a stage config, validated by the stage-config schema; the CPU example
  of docs/server.md equals the one the server tests run.
* ```python: executed in a fresh interpreter on the tiny checkpoints
  (`/path/to/<Model>` becomes the tiny checkpoint of that family).
* paths in backticks (`docs/x.md`, `server/app.py`) exist in the repository, and
  values quoted from a shipped stage config (`max_model_len: N` next to
  a shipped stage config's path, `families/<family>/stage_config.yaml`) are the file's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("bash", "python", "yaml")
# `/path/to/<name>` in examples -> the checkpoint family whose tiny checkpoint stands in for it.
PLACEHOLDERS = {"/path/to/Qwen-Image": "qwen-image", "/path/to/BAGEL-7B-MoT": "bagel",
                "/path/to/FLUX.1-dev": "flux"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang})"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lang, start, lines = [], None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip() or "<none>", i, []
            else:
                blocks.append(Block(path, start, lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path}: unclosed code fence at line {start}"
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in fenced_blocks(doc)]


def _of(lang: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.lang == lang]


def test_every_block_says_its_language():
    unknown = [str(b) for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"blocks this test cannot check (tag them {LANGUAGES}): {unknown}"


def test_readme_starts_with_exactly_the_two_make_commands():
    first = fenced_blocks(ROOT / "README.md")[0]
    commands = [line.split("#")[0].strip() for line in first.text.splitlines()]
    assert commands == ["make demo", "make test"], commands


# ---- bash -------------------------------------------------------------------------------------
def _commands(block: Block) -> list[list[str]]:
    out = []
    for line in block.text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_pip(words: list[str]) -> None:
    verb, args = words[1], [w for w in words[2:] if not w.startswith("-")]
    assert verb in ("install", "uninstall", "wheel"), words
    if verb == "install":
        index = words.index("--extra-index-url") + 1 if "--extra-index-url" in words else None
        for spec in (a for i, a in enumerate(words[2:], 2) if not a.startswith("-") and i != index):
            m = re.fullmatch(r"(\./|vllm-omni-plugin)\[(\w+)\]", spec)
            assert m, f"unexpected install spec {spec!r}"
            assert m.group(2) in _extras(), f"extra {m.group(2)!r} is not in pyproject.toml"
    else:
        assert args, words


def _check_vllm_omni(words: list[str]) -> None:
    from vllm_omni_plugin.cli import build_parser

    if words[1] == "serve":
        _check_serve(words[2:])
        return
    with_placeholders = [w.replace("/path/to/", "/tmp/") for w in words[1:]]
    build_parser().parse_args(with_placeholders)  # exits (fails the test) on an unknown subcommand or flag


def _check_serve(args: list[str]) -> None:
    from vllm_omni_plugin.server.flags import make_parser

    parser = make_parser()
    helps = [a for a in args if a.startswith("--help")]
    if helps:
        group = helps[0].partition("=")[2]
        titles = {g.title for g in parser._action_groups}
        assert not group or group in titles, f"--help={group}: no such flag group ({sorted(titles)})"
        return
    parser.parse_args(args)


def _check_command(words: list[str], block: Block) -> None:
    program = Path(words[0]).name
    if program == "make":
        assert set(words[1:]) <= _make_targets(), f"{block}: make {words[1:]}: targets are {_make_targets()}"
    elif program == "pip":
        _check_pip(words)
    elif program == "vllm-omni":
        _check_vllm_omni(words)
    elif program == "vllm":
        assert words[1] == "serve" and "--omni" in words, f"{block}: the docs show `vllm serve ... --omni` only"
        _check_serve([w for w in words[2:] if w != "--omni"])
    elif program == "vllm-router":
        from vllm_router.launch_router import parse_router_args

        parse_router_args(words[1:])  # exits (fails the test) on an unknown flag or a bad value
    elif program == "python" and words[1] == "-m":
        import importlib.util

        assert importlib.util.find_spec(words[2]) is not None, f"{block}: no module {words[2]}"
    else:
        raise AssertionError(f"{block}: the docs test does not know the command {words[0]!r}; teach it")


@pytest.mark.parametrize("block", _of("bash"), ids=str)
def test_bash_commands_exist_with_their_flags(block):
    for words in _commands(block):
        _check_command(words, block)


# ---- yaml -------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", _of("yaml"), ids=str)
def test_yaml_examples_are_valid_stage_configs(block):
    from vllm_omni_plugin.orchestrator.stage_config import parse_stage_config

    config = parse_stage_config(block.text, str(block))
    if len(config.stages) > 1 and "BagelForConditionalGeneration" in config.architectures:
        # img2img (/v1/images/edits) needs the AR stage to take the VAE's edit image
        limits = config.stage("ar").engine_args.get("limit_mm_per_prompt") or {}
        assert limits.get("vae_image"), f"{block}: limit_mm_per_prompt lacks vae_image: edits would answer 400"


def test_the_server_docs_cpu_example_is_the_one_the_server_tests_run():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from server.conftest import BAGEL_STAGE_CONFIG
    finally:
        sys.path.remove(str(ROOT / "tests"))
    (example,) = [b for b in _of("yaml") if b.path.name == "server.md"]
    assert yaml.safe_load(example.text) == yaml.safe_load(BAGEL_STAGE_CONFIG)


# ---- prose: paths and quoted values -----------------------------------------------------------
_PATHISH = re.compile(r"`([\w./-]+\.(?:md|py|yaml|toml|sh))(?::[^`]*)?`")


def _exists(rel: str, doc: Path) -> bool:
    """A path as the docs write it: repo-relative, package-relative, a bare file name, or an installed
    dependency's (`vllm/...`, `torch/...`: docs/gpu.md quotes torch's source)."""
    if "/" not in rel:  # a bare file name in a section about its folder
        return any(p.name == rel for p in ROOT.rglob(rel) if ".venv" not in p.parts)
    top = rel.split("/", 1)[0]
    if top in ("vllm", "torch", "diffusers", "transformers"):
        import importlib

        return (Path(importlib.import_module(top).__file__).parents[1] / rel).exists()
    bases = (ROOT, ROOT / "vllm_omni_plugin", ROOT / "vllm_omni_plugin" / "diffusion", ROOT / "vllm_omni", doc.parent)
    return any((base / rel).exists() for base in bases)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_the_docs_exist(doc):
    missing = [rel for rel in _PATHISH.findall(doc.read_text()) if not _exists(rel, doc)]
    assert not missing, f"{doc.relative_to(ROOT)} names files that are not in the repository: {missing}"


def test_values_quoted_from_shipped_stage_configs_are_the_files():
    quoted = re.compile(r"`((?:vllm_omni_plugin/)?families/\w+/[\w-]+\.yaml)`[^.]*?`(\w+): ([^`]+)`", re.S)
    checked = 0
    for doc in DOCS:
        for name, key, value in quoted.findall(doc.read_text()):
            text = (ROOT / "vllm_omni_plugin" / name.removeprefix("vllm_omni_plugin/")).read_text()
            found = re.findall(rf"^\s*{re.escape(key)}:\s*([^#\n]+?)\s*(?:#.*)?$", text, re.M)
            assert yaml.safe_load(value) in [yaml.safe_load(v) for v in found], (
                f"{doc.relative_to(ROOT)} quotes `{key}: {value}` from {name}, which says {found}")
            checked += 1
    assert checked, "no quoted stage-config value found: the check above has nothing to check"


# ---- python -----------------------------------------------------------------------------------
def _python_blocks() -> list:
    marks = []
    for b in _of("python"):
        engine = "BAGEL" in b.text
        marks.append(pytest.param(b, id=str(b), marks=[pytest.mark.engine] if engine else []))
    return marks


@pytest.mark.parametrize("block", _python_blocks())
def test_python_examples_run_on_tiny_checkpoints(block, checkpoint, tmp_path):
    code = block.text
    for placeholder, family in PLACEHOLDERS.items():
        code = code.replace(placeholder, str(checkpoint(family)))
    assert "/path/to/" not in code, f"{block}: a placeholder path without a tiny checkpoint in PLACEHOLDERS"
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # as a user runs it
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, f"{block} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for saved in re.findall(r'\.save\("([^"]+)"\)', code):
        assert (tmp_path / saved).is_file(), f"{block}: {saved} was not written"
