"""`vllm ... --omni` lands here (vLLM's `maybe_run_omni`); delegate to vllm-omni-plugin."""

import sys


def main() -> None:
    from vllm_omni_plugin.cli_errors import run_command
    from vllm_omni_plugin.server.cli import main_from_vllm

    code = run_command(main_from_vllm, sys.argv[1:], prog="vllm serve --omni")
    if code:
        sys.exit(code)
