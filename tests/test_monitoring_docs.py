"""The Grafana dashboard and the Prometheus alerts in docs/monitoring ask only for metrics that
GET /metrics serves."""
from __future__ import annotations

import json
import re

import yaml

from tests.support import ROOT

METRIC = re.compile(r"\brenderq_[a-z_]+")
FAMILY = re.compile(r"^# TYPE (renderq_[a-z_]+) (\w+)", re.MULTILINE)


def served(body: str) -> set[str]:
    """Every series name /metrics can answer with, counters' _total and histograms' parts included."""
    names = set()
    for family, kind in FAMILY.findall(body):
        names.add(family)
        if kind == "histogram":
            names |= {family + suffix for suffix in ("_bucket", "_sum", "_count")}
        if kind == "counter":
            names.add(family + "_total")
    return names


def test_every_dashboard_and_alert_query_names_a_served_metric(client, stack):
    body = client.get("/metrics").get_data(as_text=True)
    available = served(body)
    dashboard = json.loads((ROOT / "docs" / "monitoring" / "grafana-dashboard.json").read_text())
    alerts = yaml.safe_load((ROOT / "docs" / "monitoring" / "prometheus-alerts.yml").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    asked = {name for query in queries for name in METRIC.findall(query)}
    assert asked and not asked - available, "not served by /metrics: %s" % sorted(asked - available)
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert {"RenderqBacklogStuck", "RenderqGeneratorErrorRate", "RenderqReconcilerNotRunning"} <= names
