"""How the command line reports a failure: one line, the traceback only when asked for.

Both entry points (`vllm-omni ...` and vLLM's `vllm serve ... --omni` hook, the
`vllm_omni` shim) run their command through `run_command`. A failure prints

    vllm-omni: error: <what went wrong and what to change>

on stderr and exits 1; `--debug` (taken out of the command line before any
parser sees it) or `VLLM_LOGGING_LEVEL=DEBUG` re-raises it with its traceback
instead. The messages carry the cause and the fix (ARCHITECTURE.md: errors name
the flag, the field and the fix), so the traceback is for bug reports only.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether it was there (or VLLM_LOGGING_LEVEL is DEBUG)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    debug = len(rest) != len(argv) or os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "DEBUG"
    return rest, debug


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its message (type name where the message alone is unclear)."""
    message = " ".join(str(exc).split()) if str(exc).strip() else ""
    if isinstance(exc, (FileNotFoundError, KeyError, ImportError, AttributeError, TypeError)) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return message


def run_command(command: Callable[[list[str]], int], argv: Sequence[str], prog: str = "vllm-omni") -> int:
    """Run `command(argv without --debug)`; a failure is one line on stderr and exit code 1.

    Args:
        command: the command's main function; returns its exit code.
        argv: the command line after the program name.
        prog: the name the error line starts with.

    Returns:
        The command's exit code, 1 when it raised, 130 on Ctrl-C.
    """
    rest, debug = split_debug(argv)
    try:
        return command(rest)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise  # argparse's own usage errors and --help are already one clear message
    except Exception as exc:  # noqa: BLE001 -- reported in full below, or re-raised under --debug
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}  (--debug shows the traceback)", file=sys.stderr)
        return 1
