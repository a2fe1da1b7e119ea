"""Offline `Omni` instances for the server tests, with the servers' stage defaults."""

from __future__ import annotations

import json

from .conftest import STAGE_DEFAULTS

_cache: dict = {}


def offline(checkpoint, family: str):
    if family not in _cache:
        from vllm_omni_plugin.omni import Omni

        _cache[family] = Omni(str(checkpoint(family)), stage_defaults=json.loads(STAGE_DEFAULTS[family]))
    return _cache[family]


def comparable(resolved: dict) -> dict:
    """Resolved params as JSON carries them (tuples -> lists)."""
    return json.loads(json.dumps(resolved))
