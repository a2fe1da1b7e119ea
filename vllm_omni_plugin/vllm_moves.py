"""vLLM symbols that moved between the vLLM versions this plugin supports, and where each one is.

One table, one lookup: code that needs a moved symbol calls `vllm_symbol(name)`, which imports it
from the first module (in version order) that has it. The contract checks (contracts.py) check
that every entry resolves on the installed vLLM. Symbols that did not move are imported directly.
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> ((first vLLM version with this location, module), ...), oldest first
MOVED: dict[str, tuple[tuple[str, str], ...]] = {
    "make_arg_parser": (("0.32", "vllm.entrypoints.launchers.cli_args"), ("0.33", "vllm.entrypoints.common.cli_args")),
    "validate_parsed_serve_args": (("0.32", "vllm.entrypoints.launchers.cli_args"),
                                   ("0.33", "vllm.entrypoints.common.cli_args")),
    "cli_env_setup": (("0.32", "vllm.entrypoints.serve.utils.api_utils"), ("0.33", "vllm.entrypoints.common.startup")),
    # patches/cpu_attn_known_kv_layout.py (the CPU build exists as 0.32 only; the contract checks 0.33 too)
    "is_quantized_kv_cache": (("0.32", "vllm.utils.torch_utils"), ("0.33", "vllm.v1.kv_cache_interface")),
}


class SymbolMoved(ImportError):
    """A moved symbol is in none of the locations `MOVED` declares for it."""


def vllm_symbol(name: str) -> Any:
    """The vLLM object `name` of `MOVED`, from whichever declared module has it.

    Args:
        name: a key of `MOVED`.

    Returns:
        the object.

    Raises:
        SymbolMoved: no declared location has it (a vLLM outside the supported range).
    """
    tried = []
    for version, module in MOVED[name]:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            tried.append(f"{module} (vLLM {version}: {type(e).__name__})")
    import vllm

    raise SymbolMoved(f"vLLM {vllm.__version__} has no {name} where vllm-omni-plugin looks: {'; '.join(tried)}")
