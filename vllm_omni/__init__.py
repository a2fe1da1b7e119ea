"""Shim: the import name vLLM 0.32's CLI looks for when `--omni` is given.

vLLM's `vllm/entrypoints/cli/main.py` checks `find_spec("vllm_omni")` and calls
`vllm_omni.entrypoints.cli.main:main` for any command line containing
`--omni`. This package exists only to answer that hook and delegates straight
to `vllm_omni_plugin.server.cli`. It conflicts with the real vllm-omni project,
which installs the same import name: install one or the other (see
docs/server.md); `vllm-omni serve MODEL` works either way.
"""
