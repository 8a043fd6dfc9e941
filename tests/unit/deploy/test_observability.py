"""Prometheus config, alert rules and the Grafana dashboard only name metrics and labels crescent exports.

Queries are parsed by real Prometheus (`promtool check rules`, the dashboard's queries wrapped as recording rules);
the selectors and groupings are then read with a few regular expressions, enough for the PromQL written here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from crescent.services.common import metrics as m
from tests.unit.deploy.scripts import DEPLOY, REPO, load

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


# A metric name (whole: possessive, not after another name character) and its optional {matchers}; a name followed
# by "(" is a function. Label lists of by/on/... are removed first, so their labels are not taken for names.
SELECTOR = re.compile(r'(?<![a-zA-Z0-9_:.])([a-zA-Z_:][a-zA-Z0-9_:]*+)\s*(\{[^}]*\})?(?!\s*\()')
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r'\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)')
KEYWORDS = {"by", "on", "without", "ignoring", "and", "or", "unless", "bool", "group_left", "group_right", "offset"}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every vector selector in a query."""
    bare = re.sub(r"\[[^\]]*\]", "", GROUPING.sub("", expr))  # no label lists or range durations
    return [(m.group(1), MATCHER.findall(m.group(2) or "")) for m in SELECTOR.finditer(bare)
            if m.group(1) not in KEYWORDS]


def groupings(expr: str) -> list[set[str]]:
    return [{label.strip() for label in labels.split(",") if label.strip()} for labels in GROUPING.findall(expr)]


def selector_labels(name: str) -> set[str]:
    if name in SERIES:
        return SERIES[name] | TARGET_LABELS
    if name in STANDARD_SERIES:
        return STANDARD_SERIES[name] | TARGET_LABELS
    return set()


@pytest.mark.parametrize("source,expr", QUERIES, ids=[s for s, _ in QUERIES])
def test_query_names_only_exported_metrics_and_labels(source, expr):
    found = selectors(expr)
    assert found, f"{source}: no selector found in {expr}"
    for name, matchers in found:
        assert name in SERIES or name in STANDARD_SERIES or name in RECORDED, \
            f"{source}: {name} is not in services/common/metrics.py"
        if name not in RECORDED:
            unknown = {label for label, _, _ in matchers} - selector_labels(name)
            assert not unknown, f"{source}: {name} has no label(s) {unknown}"
    exported = [name for name, _ in found if name not in RECORDED]
    for grouping in groupings(expr):
        # Every grouping label must exist on some selector of the query (histogram `le` on its _bucket series).
        assert any(grouping <= selector_labels(name) for name in exported), \
            f"{source}: groups by {grouping}, which no selector of the query carries"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make system)")
def test_dashboard_queries_parse_in_prometheus(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "dashboard.yml")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_selector_reading_on_known_queries():
    expr = 'sum by (role) (rate(crescent_worker_preemptions_total{role="decode", x=~"a|b"}[5m])) > on (role) up'
    assert selectors(expr) == [("crescent_worker_preemptions_total", [("role", "=", "decode"), ("x", "=~", "a|b")]),
                               ("up", [])]
    assert groupings(expr) == [{"role"}, {"role"}]
    assert selectors("histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))") == [("h_bucket", [])]


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
    les = {(name, value) for _, expr in QUERIES for name, matchers in selectors(expr)
           for label, _, value in matchers if label == "le"}
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
