"""`vllm ... --omni` lands here (vLLM's `maybe_run_omni`); delegate to vllm-omni-plugin."""

import sys


def main() -> None:
    from vllm_omni_plugin.server.cli import main_from_vllm

    code = main_from_vllm()
    if code:
        sys.exit(code)
