"""What the Grafana dashboard (examples/grafana/omni-dashboard.json) queries, and what a server's
/metrics offers, for the dashboard and metrics-docs tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "omni-dashboard.json"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
# Labels Prometheus adds at scrape time, and histogram buckets' own
_SCRAPE_LABELS = {"instance", "job", "le"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels and template variables."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def queried_series(expr: str) -> set[str]:
    return set(re.findall(r"\b(omni_[a-z0-9_]+)", expr))


def grouped_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")} - _SCRAPE_LABELS


def omni_families(server) -> dict[str, dict]:
    """The omni_* metric families on the server's /metrics: name -> {type, series (sample names it
    can have), labels (seen on its samples)}."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        # prometheus_client's `_created` timestamps parse as families of their own: part of their family
        if fam.name.startswith("omni_") and not fam.name.endswith("_created"):
            out[fam.name] = {
                "type": fam.type,
                "series": {fam.name + s for s in _SUFFIXES[fam.type]},
                "labels": {k for s in fam.samples for k in s.labels} - {"le"},
                "samples": fam.samples,
            }
    return out


def documented_metrics() -> set[str]:
    """The metric names of the Metrics table of docs/server.md (first column)."""
    text = (ROOT / "docs" / "server.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(omni_[a-z0-9_]+)`", section, re.M))
