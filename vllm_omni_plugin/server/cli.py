"""Entry points: `vllm serve MODEL --omni [vLLM serve flags] [omni flags]` and `vllm-omni serve`.

vLLM 0.32's CLI hands any argv containing `--omni` to
`vllm_omni.entrypoints.cli.main:main` (our shim package, see
docs/server.md), which calls `main_from_vllm`; `vllm-omni serve MODEL ...`
reaches the same `serve_main` without going through that hook. The flags are
server/flags.py's; what runs is server/launch.py's `run_server`.
"""

from __future__ import annotations

import sys
from typing import Sequence

import uvloop

from ..vllm_moves import vllm_symbol
from .flags import parse_args
from .launch import run_server

cli_env_setup = vllm_symbol("cli_env_setup")  # moved in vLLM 0.33 (vllm_moves.py)


def serve_main(argv: Sequence[str]) -> int:
    """`vllm-omni serve ...` and `vllm serve ... --omni` end here.

    Args:
        argv: the serve arguments (after `serve`).

    Returns:
        the exit status (0; failures raise, and `cli_errors.run_command` prints them).
    """
    cli_env_setup()
    args = parse_args(argv)
    # A bad flag, a model that is not there, a stage default the model does not read: the
    # caller (cli_errors.run_command) prints one line and exits 1; --debug shows the traceback.
    uvloop.run(run_server(args))
    return 0


def main_from_vllm(argv: Sequence[str] | None = None) -> int:
    """What vLLM's `maybe_run_omni` calls: argv is the whole `vllm ...` command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if a != "--omni"]
    if not rest or rest[0] != "serve":
        print(
            "vllm-omni-plugin: --omni is a flag of `vllm serve` (e.g. `vllm serve MODEL --omni`); "
            f"got `vllm {' '.join(argv)}`",
            file=sys.stderr,
        )
        return 2
    return serve_main(rest[1:])
