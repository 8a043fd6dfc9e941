"""Prometheus config, alert rules and the Grafana dashboard only name metrics and labels crescent exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from crescent.services.common import metrics as m
from tests.unit.deploy.scripts import DEPLOY, REPO, load

promql = load("grafana/promql")
dashboard = load("grafana/dashboard")

ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "crescent-dashboard.json").read_text())
# Labels Prometheus attaches to every scraped series (job/instance by itself; component by our scrape configs
# and the chart's ServiceMonitor relabeling; namespace/pod/service by the Prometheus Operator).
TARGET_LABELS = {"job", "instance", "component", "namespace", "pod", "service", "container", "endpoint"}
STANDARD_SERIES = {"up": set()}


def exported_series() -> dict[str, set[str]]:
    """Every series name the metrics module exposes -> its label names (counter _total, histogram parts)."""
    series: dict[str, set[str]] = {}
    for obj in vars(m).values():
        if not isinstance(obj, Counter | Gauge | Histogram):
            continue
        name, labels = obj.describe()[0].name, set(obj._labelnames)
        if isinstance(obj, Counter):
            series[name + "_total"] = labels
        elif isinstance(obj, Histogram):
            for part in ("_bucket", "_sum", "_count"):
                series[name + part] = labels | ({"le"} if part == "_bucket" else set())
        else:
            series[name] = labels
    return series


SERIES = exported_series()


def rule_queries() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for g in ALERTS["groups"] for r in g["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"].replace("$__rate_interval", "5m"))
            for p in DASHBOARD["panels"] for t in p.get("targets", [])]


RECORDED = {r["record"] for g in ALERTS["groups"] for r in g["rules"] if "record" in r}
QUERIES = rule_queries() + dashboard_queries()


def selector_labels(name: str) -> set[str]:
    if name in SERIES:
        return SERIES[name] | TARGET_LABELS
    if name in STANDARD_SERIES:
        return STANDARD_SERIES[name] | TARGET_LABELS
    return set()


@pytest.mark.parametrize("source,expr", QUERIES, ids=[s for s, _ in QUERIES])
def test_query_names_only_exported_metrics_and_labels(source, expr):
    tree = promql.parse(expr)
    for node in promql.walk(tree):
        if isinstance(node, promql.Selector):
            assert node.name in SERIES or node.name in STANDARD_SERIES or node.name in RECORDED, \
                f"{source}: {node.name} is not in services/common/metrics.py"
            if node.name not in RECORDED:
                unknown = {label for label, _, _ in node.matchers} - selector_labels(node.name)
                assert not unknown, f"{source}: {node.name} has no label(s) {unknown}"
        grouping = node.by if isinstance(node, promql.Agg) else getattr(node, "on", None)
        for sel in (n for n in promql.walk(node) if isinstance(n, promql.Selector) and n.name not in RECORDED):
            missing = set(grouping or []) - selector_labels(sel.name)
            assert not missing, f"{source}: groups {sel.name} by {missing}, labels it does not have"


def test_metric_name_scan_agrees_with_parser():
    """A plain regex scan catches crescent_* names even where a future query form escapes the parser."""
    for source, expr in QUERIES:
        for name in re.findall(r"\b(crescent_[a-z0-9_]+|vllm:[a-z0-9_:]+)", expr):
            assert name in SERIES, f"{source}: {name} is not exported"


def test_recording_rules_used_by_alerts_are_defined():
    for source, expr in rule_queries():
        for name in re.findall(r"\bcrescent:[a-z0-9_:]+", expr):
            assert name in RECORDED, f"{source}: uses {name}, which no rule records"


def test_slo_thresholds_are_bucket_bounds_and_agree():
    # An `le` the histogram does not have would make every SLO query return nothing.
    les = {(sel.name, value) for _, expr in QUERIES for sel in promql.walk(promql.parse(expr))
           if isinstance(sel, promql.Selector) for label, _, value in sel.matchers if label == "le"}
    assert les == {("crescent_gateway_time_to_first_token_seconds_bucket", repr(dashboard.TTFT_SLO_S)),
                   ("crescent_gateway_inter_token_latency_seconds_bucket", repr(dashboard.TBT_SLO_S))}
    assert dashboard.TTFT_SLO_S in m.LATENCY_BUCKETS and dashboard.TBT_SLO_S in m.TOKEN_GAP_BUCKETS
    chart = yaml.safe_load((REPO / "helm" / "crescent" / "values.yaml").read_text())
    assert (chart["slo"]["ttftSeconds"], chart["slo"]["tbtSeconds"]) == (dashboard.TTFT_SLO_S, dashboard.TBT_SLO_S)
    thresholds = {p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
                  for p in DASHBOARD["panels"] if p["type"] == "timeseries"}
    assert thresholds["Time to first token"][-1] == dashboard.TTFT_SLO_S
    assert thresholds["Time between tokens"][-1] == dashboard.TBT_SLO_S


def test_alert_rules_are_well_formed():
    alerts = [r for g in ALERTS["groups"] for r in g["rules"] if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "ticket", "warning"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    # The four kinds the runbook promises: SLO burn, rejection spike, a worker down, the store near capacity.
    assert {"CrescentTTFTBudgetBurnFast", "CrescentTBTBudgetBurnFast", "CrescentRejectionSpike",
            "CrescentWorkerDown", "CrescentKVStoreNearCapacity"} <= set(names)


def test_prometheus_scrapes_every_service_with_a_component_label():
    assert PROMETHEUS["rule_files"] == ["alerts.yml"]
    targets = {c["labels"]["component"]: c["targets"] for job in PROMETHEUS["scrape_configs"]
               for c in job["static_configs"]}
    assert targets["gateway"] == ["gateway:8000"]
    assert targets["conductor"] == ["conductor:9051"]
    assert targets["prefill"] == ["prefill:9061"]
    assert targets["decode"] == ["decode:9071"]
    assert targets["kvstore"] == ["kvstore:9081"]


def test_dashboard_is_fresh_and_covers_the_brief():
    assert dashboard.main(["--check"]) == 0, "stale: run .venv/bin/python deploy/grafana/dashboard.py"
    exprs = " ".join(e for _, e in dashboard_queries())
    for needed in ("crescent_gateway_requests_total", "crescent_conductor_rejections_total",
                   "crescent_gateway_time_to_first_token_seconds_bucket",
                   "crescent_gateway_inter_token_latency_seconds_bucket", "crescent_worker_requests_running",
                   "crescent_worker_requests_waiting", "crescent_kvstore_bytes_used",
                   "crescent_worker_prefix_cache_hits_total", "crescent_kvstore_transfer_seconds_bucket", "up{"):
        assert needed in exprs
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
