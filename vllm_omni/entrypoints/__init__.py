"""See vllm_omni/__init__.py: a delegation shim for vLLM's `--omni` hook."""
