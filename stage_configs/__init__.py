"""The stage configs shipped with the plugin (`vllm_omni_plugin.stage_configs`): a view over the families.

Each family keeps its stage YAML in its own folder
(`vllm_omni_plugin/families/<family>/stage_config.yaml`, declared as
`Family.stage_config`, docs/families.md); this package lists them where the
design card's top-level `stage_configs/` folder promises them. The schema is
`vllm_omni_plugin/orchestrator/stage_config.py`.
"""

from __future__ import annotations

from pathlib import Path

from vllm_omni_plugin.registry import families


def shipped() -> dict[str, Path]:
    """Family name -> its shipped stage config file, for every family that ships one."""
    return {name: path for name, family in families().items() if (path := family.stage_config_path()) is not None}
