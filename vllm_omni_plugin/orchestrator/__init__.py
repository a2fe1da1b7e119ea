"""Multi-stage pipelines: stage configs -> stages -> outputs.

Which orchestrator runs a checkpoint is declared by its family
(`Family.orchestrator`, vllm_omni_plugin/families/); `orchestrator_for` reads
that declaration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

def orchestrator_for(model: str | Path, stage_config: Any) -> Any:
    """The orchestrator class that runs a multi-stage checkpoint.

    Args:
        model: the checkpoint directory.
        stage_config: its StageConfig (its `architectures` name the family).

    Returns:
        the class; call `await cls.create(model, stage_config, ...)` on it.

    Raises:
        ValueError: no family declares an orchestrator for these architectures.
    """
    from ..registry import identify, stage_family

    archs = [*identify(model).names, *stage_config.architectures]
    family = stage_family(archs)
    if family is None:
        raise ValueError(f"{model}: no orchestrator is declared for architectures {', '.join(archs) or 'none'}")
    return family.load(family.orchestrator)
