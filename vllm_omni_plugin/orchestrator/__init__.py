"""Multi-stage pipelines: stage configs -> stages -> outputs.

Which orchestrator runs a checkpoint is declared by its family
(`Capabilities.orchestrator` on the pipeline class, see
`diffusion/pipelines.MULTISTAGE`); `orchestrator_for` reads that declaration.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# orchestrator name (as families declare it) -> "module:Class" under this package,
# imported on use (only multi-stage models need vLLM).
ORCHESTRATORS: dict[str, str] = {
    "bagel": "bagel:BagelOrchestrator",
    "glm_image": "glm_image:GlmImageOrchestrator",
}


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
    from ..diffusion.pipelines import multistage_family
    from .offline import checkpoint_architectures

    archs = [*checkpoint_architectures(model), *stage_config.architectures]
    family = multistage_family(archs)
    name = family.capabilities.orchestrator if family is not None else None
    if name not in ORCHESTRATORS:
        raise ValueError(f"{model}: no orchestrator is declared for architectures {', '.join(archs) or 'none'}")
    module, cls = ORCHESTRATORS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
