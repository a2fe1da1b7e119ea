"""Synchronous offline access to a multi-stage orchestrator (used by `Omni`).

The orchestrator is asyncio-native (the server awaits it on its own loop);
offline callers get a private event loop on a daemon thread, so `Omni.generate`
stays a plain blocking call and runs the very same code path as the server.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Coroutine, TypeVar

from ..registry import identify
from .stage_config import StageConfig, load_stage_config, stage_config_for

T = TypeVar("T")


def checkpoint_architectures(model: str | Path) -> list[str]:
    """What a checkpoint says it is: config.json's architectures, or a diffusers
    directory's pipeline class (model_index.json `_class_name`, e.g. GlmImagePipeline);
    read by the family registry's `identify`."""
    return list(identify(model).names)


def multistage_config(model: str | Path, stage_config: str | Path | StageConfig | None = None) -> StageConfig | None:
    """The stage config of a multi-stage model: the given one, or the shipped one for its architecture."""
    if isinstance(stage_config, StageConfig):
        config = stage_config
    elif stage_config is not None:
        config = load_stage_config(stage_config)
    else:
        config = stage_config_for(checkpoint_architectures(model))
    return config if config is not None and len(config.stages) > 1 else None


class BackgroundLoop:
    """An event loop on a daemon thread; `run(coro)` blocks until it completes there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="omni-offline-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
