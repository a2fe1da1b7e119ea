"""The omni metrics a diffusion-only server exposes are the ones docs/server.md lists, and every
series the Grafana dashboard queries (and every label it groups by) is on the server's /metrics."""

from __future__ import annotations

import json

import pytest

from .dashboard import DASHBOARD, dashboard_queries, documented_metrics, grouped_labels, omni_families, queried_series

pytestmark = pytest.mark.engine

# Families a diffusion-only server declares but feeds only on multi-stage models (test_bagel_metrics.py)
MULTISTAGE_ONLY = {"omni_stage_seconds", "omni_kv_handover_seconds", "omni_kv_handover_bytes"}


def test_dashboard_is_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_queries_and_docs_match_a_running_server(omni_server):
    server = omni_server("qwen-image")
    client = server.client()
    client.images.generate(model="tiny-qwen-image", prompt="a cat", extra_body={"seed": 1})  # labelled series appear
    families = omni_families(server)
    offered = {s for f in families.values() for s in f["series"]}
    for expr in dashboard_queries():
        missing = queried_series(expr) - offered
        assert not missing, f"the dashboard queries {missing}, not on /metrics: {expr}"
        for name in queried_series(expr):
            family = next(f for f in families.values() if name in f["series"])
            if family["samples"] and family["labels"]:
                assert grouped_labels(expr) <= family["labels"] | _other_labels(expr, families), expr
    every_series = {s for e in dashboard_queries() for s in queried_series(e)}
    # the dashboard shows every family (none exposed and left out)
    assert {n for n in families if not (families[n]["series"].isdisjoint(every_series))} == set(families)
    # docs/server.md lists every family by the name it is queried by (counters with _total)
    exposed = {n + "_total" if f["type"] == "counter" else n for n, f in families.items()}
    assert documented_metrics() == exposed
    assert set(families) >= MULTISTAGE_ONLY  # declared on every server, so dashboards never show "no data" errors


def _other_labels(expr: str, families: dict) -> set[str]:
    """Labels of the other families one expression names (a ratio of two series)."""
    return {label for n in queried_series(expr) for f in families.values() if n in f["series"] for label in f["labels"]}
