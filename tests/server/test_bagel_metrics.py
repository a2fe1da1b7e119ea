"""A multi-stage (BAGEL) server feeds the stage and KV hand-over metrics the dashboard shows."""

from __future__ import annotations

import pytest

from .dashboard import dashboard_queries, grouped_labels, omni_families, queried_series

pytestmark = pytest.mark.engine

STAGES = {"ar_prefill", "kv_handover", "diffusion", "decode", "total"}


def _value(families, family: str, sample: str, **labels) -> float:
    return sum(s.value for s in families[family]["samples"] if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_stage_and_handover_metrics(omni_server):
    server = omni_server("bagel")
    before = omni_families(server)
    server.client().images.generate(model="tiny-bagel", prompt="a red cat", size="32x32", extra_body={"seed": 4})
    after = omni_families(server)
    assert _value(after, "omni_kv_handover_seconds", "omni_kv_handover_seconds_count") - \
        _value(before, "omni_kv_handover_seconds", "omni_kv_handover_seconds_count") == 1
    assert _value(after, "omni_kv_handover_bytes", "omni_kv_handover_bytes_total") > \
        _value(before, "omni_kv_handover_bytes", "omni_kv_handover_bytes_total")
    assert {s.labels["stage"] for s in after["omni_stage_seconds"]["samples"]} == STAGES
    for stage in STAGES:
        assert _value(after, "omni_stage_seconds", "omni_stage_seconds_count", stage=stage) - \
            _value(before, "omni_stage_seconds", "omni_stage_seconds_count", stage=stage) == 1
    # every dashboard query is answerable here too (the multi-stage panels included)
    offered = {s for f in after.values() for s in f["series"]}
    labels = {label for f in after.values() for label in f["labels"]}
    for expr in dashboard_queries():
        assert queried_series(expr) <= offered and grouped_labels(expr) <= labels, expr
