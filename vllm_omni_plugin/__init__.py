"""vllm-omni-plugin: image, video and multi-stage generation for vLLM.

Importing this package is cheap and never imports vLLM: the plugin entry point
(`vllm_omni_plugin.plugin:register`) is what vLLM calls, and the offline API
(`Omni`) is loaded lazily.
"""

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it (dynamic), CHANGELOG.md names it


def __getattr__(name: str):
    # Lazy: `from vllm_omni_plugin import Omni` loads torch/diffusers only when asked.
    if name == "Omni":
        from .omni import Omni

        return Omni
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
