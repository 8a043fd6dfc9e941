"""Generate deploy/grafana/crescent-dashboard.json (checked in; a test fails when it is stale).

Regenerate: ``.venv/bin/python deploy/grafana/dashboard.py``.

Panels are declared as data so the PNG renderer (render.py) draws the same queries Grafana runs, through a real
Prometheus. SLO lines are panel thresholds and must match the chart's default SLOs (deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_PATH = Path(__file__).resolve().parent / "crescent-dashboard.json"
TTFT_SLO_S = 2.0   # chart slo.ttftSeconds default; a bucket bound of LATENCY_BUCKETS
TBT_SLO_S = 0.2    # chart slo.tbtSeconds default; a bucket bound of TOKEN_GAP_BUCKETS
RATE = "$__rate_interval"
MODEL = '{model_name=~"$model_name"}'
"""The gateway's request metrics carry model_name: its panels follow the dashboard's model variable (All = .*)."""
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]          # (PromQL, legend format)
    unit: str = "short"
    description: str = ""
    slo: float | None = None                # drawn as a red threshold line
    max: float | None = None
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def quantiles(metric: str, by: str = "", select: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{select}[{RATE}])))",
             f"{legend}p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


def ratio(num: str, den: str, by: str) -> str:
    return f"sum by ({by}) (rate({num}[{RATE}])) / sum by ({by}) (rate({den}[{RATE}]))"


ROWS: list[tuple[str, list[Panel]]] = [
    ("Requests", [
        Panel("Request rate by outcome", [(f"sum by (outcome) (rate(crescent_gateway_requests_total{MODEL}[{RATE}]))",
                                          "{{outcome}}")], "reqps", "Finished API requests.", stack=True),
        Panel("Rejections by reason", [(f"sum by (reason) (rate(crescent_conductor_rejections_total[{RATE}]))",
                                       "{{reason}}")], "reqps", "Early rejections (HTTP 429) the conductor made.",
              stack=True),
        Panel("Token throughput", [(f"sum(rate(crescent_gateway_generation_tokens_total{MODEL}[{RATE}]))", "generated"),
                                   (f"sum(rate(crescent_gateway_prompt_tokens_total{MODEL}[{RATE}]))", "prompt")],
              "short", "Tokens per second through the gateway."),
    ]),
    ("Latency against the SLOs", [
        Panel("Time to first token", quantiles("crescent_gateway_time_to_first_token_seconds", select=MODEL), "s",
              "TTFT percentiles; red line: the TTFT SLO.", slo=TTFT_SLO_S),
        Panel("Time between tokens", quantiles("crescent_gateway_inter_token_latency_seconds", select=MODEL), "s",
              "Inter-token latency percentiles; red line: the TBT SLO.", slo=TBT_SLO_S),
        Panel("End-to-end latency", quantiles("crescent_gateway_e2e_request_latency_seconds", select=MODEL), "s",
              "Whole-request latency percentiles."),
    ]),
    ("Workers", [
        Panel("Running requests per worker", [("sum by (role, instance) (crescent_worker_requests_running)",
                                               "{{role}} {{instance}}")], "short", "Requests in each running batch."),
        Panel("Waiting requests per worker", [("sum by (role, instance) (crescent_worker_requests_waiting)",
                                               "{{role}} {{instance}}")], "short", "Queue depth (the autoscaling metric)."),
        Panel("Worker KV cache usage", [("max by (role, instance) (crescent_worker_kv_cache_usage_ratio)",
                                         "{{role}} {{instance}}")], "percentunit",
              "Paged KV cache in use (the device tier).", max=1.0),
        Panel("Prefix hit rate", [
            # The engine counts KV loaded from the store as prefix-cache hits too: subtract it for "own cache".
            (f"(sum by (role) (rate(crescent_worker_prefix_cache_hits_total[{RATE}])) - sum by (role) "
             f"(rate(crescent_worker_kvstore_hit_tokens_total[{RATE}]))) / sum by (role) "
             f"(rate(crescent_worker_prefix_cache_queries_total[{RATE}]))", "{{role}} own cache"),
            (ratio("crescent_worker_kvstore_hit_tokens_total", "crescent_worker_prefix_cache_queries_total", "role"),
             "{{role}} from kvstore"),
        ], "percentunit", "Share of prompt tokens whose KV was reused instead of computed.", max=1.0),
    ]),
    ("KV store", [
        Panel("KV store usage by tier", [
            ("sum by (tier) (crescent_kvstore_bytes_used) / sum by (tier) (crescent_kvstore_capacity_bytes)",
             "{{tier}}")], "percentunit", "Bytes held over capacity, DRAM and SSD tiers.", max=1.0),
        Panel("KV store bytes", [(f"sum by (transport) (rate(crescent_kvstore_bytes_in_total[{RATE}]))",
                                  "in {{transport}}"),
                                 (f"sum by (transport) (rate(crescent_kvstore_bytes_out_total[{RATE}]))",
                                  "out {{transport}}")], "Bps", "Block bytes written and read by clients."),
        Panel("KV transfer latency", quantiles("crescent_kvstore_transfer_seconds", by="op")[1:], "s",
              "One batched transfer (p90, p99) by operation."),
        Panel("KV store operations", [(f"sum by (op, result) (rate(crescent_kvstore_operations_total[{RATE}]))",
                                       "{{op}} {{result}}")], "ops", "Gets (hit/miss), puts and lookups."),
    ]),
    ("Health", [
        Panel("Service up", [('up{component=~"gateway|conductor|prefill|decode|kvstore"}',
                              "{{component}} {{instance}}")], "short", "1 = the metrics endpoint answers.",
              max=1.0),
        Panel("Live instances (conductor's view)", [("max by (role) (crescent_conductor_instances)", "{{role}}")],
              "short", "Instances registered and heartbeating."),
    ]),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if panel.slo is not None:
        steps.append({"color": "red", "value": panel.slo})
        custom["thresholdsStyle"] = {"mode": "line+area"}
    if panel.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": panel.unit, "min": 0, "custom": custom,
                                "thresholds": {"mode": "absolute", "steps": steps}}
    if panel.max is not None:
        defaults["max"] = panel.max
    return {
        "id": panel_id, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(panel.targets)],
        **panel.extra,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row_title, row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        width = 24 // len(row)
        for i, panel in enumerate(row):
            panels.append(panel_json(panel, next_id, i * width, y, width))
            next_id += 1
        y += 8
    datasource_var = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                      "current": {}, "hide": 0, "refresh": 1}
    model_var = {"name": "model_name", "label": "Model", "type": "query", "datasource": DATASOURCE,
                 "query": {"query": "label_values(crescent_gateway_requests_total, model_name)", "refId": "models"},
                 "definition": "label_values(crescent_gateway_requests_total, model_name)", "includeAll": True,
                 "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "hide": 0,
                 "refresh": 2, "sort": 1}
    return {
        "uid": "crescent-overview", "title": "crescent", "tags": ["crescent", "llm-serving"],
        "description": "crescent serving: requests, SLOs, workers, KV cache and store, health.",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "utc",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
        "templating": {"list": [datasource_var, model_var]}, "annotations": {"list": []}, "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT_PATH.read_text() != text:
            print(f"{OUT_PATH} is stale: run .venv/bin/python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT_PATH.write_text(text)
    print(f"wrote {OUT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
