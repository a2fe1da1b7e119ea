"""The contract checks (vllm_omni_plugin/contracts.py) on the installed vLLM, and that they catch
breakage: a missing symbol, a changed parameter list, a moved symbol in none of its places.
CI runs the same checks against vLLM 0.33.0's source (scripts/check_vllm_contracts.sh)."""

from __future__ import annotations

import ast

import vllm

from vllm_omni_plugin import contracts
from vllm_omni_plugin.patches import all_patches
from vllm_omni_plugin.vllm_moves import MOVED, SymbolMoved, vllm_symbol


def test_every_contract_holds_on_the_installed_vllm():
    found = contracts.check_contracts()
    broken = [c for c in found if not c.ok]
    assert not broken, broken
    assert {c.kind for c in found} == {"patch", "import", "model", "connector", "entrypoint", "endpoint", "hook"}
    # every patch's target signature is compared by import here (the CPU build imports them all)
    targets = [c for c in found if c.kind == "patch" and "(" in c.name]
    assert len(targets) == len(all_patches()) and all(c.how == "import" for c in targets)
    # the connector overrides are all compared (OmniKVConnector's hooks)
    assert {c.name.rsplit(".", 1)[1] for c in found if c.kind == "connector"} >= {
        "get_num_new_matched_tokens", "build_connector_meta", "request_finished", "save_kv_layer", "wait_for_save"}
    assert contracts.verified_for(vllm.__version__).startswith("full")


def test_the_checks_catch_breakage():
    missing = contracts._check_symbol("import", "vllm.config.model:ModelConfig.no_such_member")
    assert not missing.ok and missing.how == "import"
    assert not contracts._check_symbol("import", "vllm.no_such_module:thing").ok
    # from source: the parameter names of a patch target, as the 0.33 run reads modules that do not import
    patch = next(p for p in all_patches() if p.name == "cpu_mm_prefix_metadata")
    node = contracts._source_lookup(patch.target)
    assert isinstance(node, ast.FunctionDef)
    assert contracts._ast_params(node) == contracts._sig_params(patch.signature) == [
        "self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    assert contracts._sig_params("(self, a: dict[str, int] = {}, *args, b: 'T' = (1, 2), **kw) -> R") == [
        "self", "a", "*args", "b", "**kw"]
    assert contracts._source_lookup("vllm.config.model:ModelConfig.no_such_member") is None


def test_moved_symbols_resolve_and_fail_clearly(monkeypatch):
    from vllm.entrypoints.launchers import cli_args

    assert vllm_symbol("make_arg_parser") is cli_args.make_arg_parser  # vLLM 0.32's place
    monkeypatch.setitem(MOVED, "make_arg_parser", (("0.30", "vllm.entrypoints.nowhere"),))
    try:
        vllm_symbol("make_arg_parser")
    except SymbolMoved as e:
        assert "vllm.entrypoints.nowhere" in str(e) and vllm.__version__ in str(e)
    else:
        raise AssertionError("a symbol in none of its declared places must raise SymbolMoved")
