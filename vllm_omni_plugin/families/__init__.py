"""Model families: one sub-package per family, found by the registry (`vllm_omni_plugin/registry.py`).

    <family>/__init__.py   FAMILY = Family(...): names and lazy "module:attr" targets only
    <family>/...           its vLLM model classes, step-wise pipeline, stage hand-over,
                           checkpoint factory, stage YAML (docs/families.md)

Nothing is imported here: the registry walks this package's folders and imports only each
family's `__init__.py`. The registry lives beside this package, not in it, so the generic
layers that ask it questions (`families()`, `family(name)`, `identify(checkpoint_dir)`) depend
on no family package, and the families depend on the generic layers, never the reverse
(the import contracts in pyproject.toml check both).
"""
