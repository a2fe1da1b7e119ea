"""The vLLM general-plugin entry point (`vllm.general_plugins` -> `omni`).

vLLM calls `register()` in every process it starts: the API server, the
engine core and each worker, and possibly more than once per process. It
applies the declared patches and registers the omni architectures; repeated
calls do nothing. The first call in a process logs one line saying what is in
place there, which answers "is the plugin loaded in that process?".
"""

from __future__ import annotations

import logging
import os
import threading

# A child of the "vllm" logger, so the line shows up with vLLM's own handler and
# level (VLLM_LOGGING_LEVEL) in every process.
logger = logging.getLogger("vllm.omni_plugin")

_done = False
_lock = threading.Lock()


def register() -> None:
    global _done
    with _lock:
        if _done:
            return
        from vllm_omni_plugin.model_registry import register_models
        from vllm_omni_plugin.patches import apply_all

        # A patch that cannot apply raises PatchError naming itself and the
        # vLLM version: running with a silently unpatched vLLM is worse.
        results = apply_all()
        archs = register_models()
        from vllm_omni_plugin.kv import register_connector

        register_connector()  # "OmniKVConnector" for --kv-transfer-config
        _done = True
    logger.info(
        "vllm-omni-plugin loaded in pid %d: patches %s; architectures %s",
        os.getpid(),
        ", ".join(f"{r.name}={r.status}" for r in results),
        ", ".join(archs),
    )
