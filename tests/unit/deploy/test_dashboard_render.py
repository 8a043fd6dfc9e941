"""The PromQL subset and the dashboard renderer, on synthetic scrapes produced by prometheus_client."""

from __future__ import annotations

import json
import math
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from crescent.services.common import metrics as m
from tests.unit.deploy.scripts import load

render = load("grafana/render")
promql = render.promql

STEP_S = 5.0
T0 = 1_700_000_000.0


def store_of(samples: list[tuple[float, str, dict[str, str], float]]):
    store = promql.SeriesStore()
    for t, name, labels, value in samples:
        store.add(t, name, labels, value)
    return store


def evaluate(store, expr: str, t: float):
    return promql.Evaluator(store).eval(promql.parse(expr), t)


def test_rate_handles_counter_resets_and_needs_two_samples():
    store = store_of([(0, "c_total", {"a": "x"}, 10), (10, "c_total", {"a": "x"}, 30), (20, "c_total", {"a": "x"}, 5)])
    # 10 -> 30 (+20), reset to 5 (+5): 25 over 20 s.
    assert evaluate(store, "rate(c_total[1m])", 20) == {frozenset({("a", "x")}): pytest.approx(1.25)}
    assert evaluate(store, "increase(c_total[15s])", 20) == {frozenset({("a", "x")}): pytest.approx(5.0)}
    assert evaluate(store, "rate(c_total[5s])", 20) == {}


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [("0.1", 10.0), ("0.5", 30.0), ("+Inf", 40.0)]
    store = store_of([(0, "h_bucket", {"le": le}, v) for le, v in buckets])
    # rank 0.5*40 = 20 falls in (0.1, 0.5]: 0.1 + 0.4 * (20-10)/(30-10) = 0.3
    assert evaluate(store, "histogram_quantile(0.5, h_bucket)", 0) == {frozenset(): pytest.approx(0.3)}
    # rank 0.9*40 = 36 falls in +Inf: the highest finite bound.
    assert evaluate(store, "histogram_quantile(0.9, h_bucket)", 0) == {frozenset(): 0.5}


def test_aggregation_matching_and_filters():
    store = store_of([(0, "used", {"tier": "dram", "i": "a"}, 3), (0, "used", {"tier": "dram", "i": "b"}, 1),
                      (0, "cap", {"tier": "dram", "i": "a"}, 8), (0, "cap", {"tier": "dram", "i": "b"}, 8),
                      (0, "used", {"tier": "ssd", "i": "a"}, 0), (0, "cap", {"tier": "ssd", "i": "a"}, 0)])
    ratio = evaluate(store, "sum by (tier) (used) / sum by (tier) (cap)", 0)
    assert ratio[frozenset({("tier", "dram")})] == pytest.approx(0.25)
    assert math.isnan(ratio[frozenset({("tier", "ssd")})])  # 0/0, as Prometheus
    assert evaluate(store, 'used{tier="dram"} / cap > 0.2', 0) == {frozenset({("tier", "dram"), ("i", "a")}): 0.375}
    assert set(evaluate(store, 'max by (i) (used) and on (i) cap{tier="ssd"}', 0)) == {frozenset({("i", "a")})}
    assert evaluate(store, "(14.4 * 0.01)", 0) == pytest.approx(0.144)


@pytest.mark.parametrize("bad,message", [
    ("sum(x) by (a)", "put `by (...)` before the body"),
    ("rate(x[5q])", "bad range '5'"),
    ("x{a=1}", "bad matcher"),
    ("sum(x", "unexpected end"),
])
def test_parse_errors_are_readable(bad, message):
    with pytest.raises(promql.ParseError, match=re.escape(message)):
        promql.parse(bad)


def name_of(metric) -> str:
    return metric.describe()[0].name


def synthetic_scrapes(steps: int = 30) -> list[str]:
    """JSON lines: a gateway, a prefill worker and a kvstore scraped every 5 s, with one failed prefill scrape."""
    gw, wk, st = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    requests = Counter(name_of(m.GATEWAY_REQUESTS), "r", ["endpoint", "outcome"], registry=gw)
    ttft = Histogram(name_of(m.GATEWAY_TTFT), "t", buckets=m.LATENCY_BUCKETS, registry=gw)
    waiting = Gauge(name_of(m.WORKER_WAITING), "w", ["role"], registry=wk)
    running = Gauge(name_of(m.WORKER_RUNNING), "r", ["role"], registry=wk)
    used = Gauge(name_of(m.STORE_BYTES_USED), "u", ["tier"], registry=st)
    cap = Gauge(name_of(m.STORE_BYTES_CAPACITY), "c", ["tier"], registry=st)
    cap.labels("dram").set(1000)
    lines = []
    for i in range(steps):
        for _ in range(10):  # 10 requests per 5 s: 2 req/s ok; TTFT 0.3 s
            requests.labels("chat", "ok").inc()
            ttft.observe(0.3)
        requests.labels("chat", "rejected").inc()  # 0.2 req/s rejected
        waiting.labels("prefill").set(i % 4)
        running.labels("prefill").set(2)
        used.labels("dram").set(10 * i)
        t = T0 + i * STEP_S
        for component, registry in (("gateway", gw), ("prefill", wk), ("kvstore", st)):
            target = {"component": component, "instance": f"{component}:1", "job": component}
            text = None if (component == "prefill" and i == steps - 1) else generate_latest(registry).decode()
            lines.append(json.dumps(render.scrape_record(t, target, text, "" if text else "refused")))
    return lines


def test_dashboard_queries_on_synthetic_scrapes():
    store, times = render.load_scrapes(synthetic_scrapes())
    window = render.default_rate_window(times)
    assert window == 4 * STEP_S
    panels = {p["title"]: p for p in json.loads(render.DASHBOARD.read_text())["panels"] if p["type"] == "timeseries"}
    at = [times[-1] - STEP_S]
    by_outcome = render.panel_series(panels["Request rate by outcome"], store, at, window)
    assert by_outcome["ok"][0][1] == pytest.approx(2.0)
    assert by_outcome["rejected"][0][1] == pytest.approx(0.2)
    ttft = render.panel_series(panels["Time to first token"], store, at, window)
    assert 0.2 < ttft["p50"][0][1] <= 0.3 and 0.2 < ttft["p99"][0][1] <= 0.3  # inside the (0.2, 0.3] bucket
    usage = render.panel_series(panels["KV store usage by tier"], store, at, window)
    assert usage["dram"][0][1] == pytest.approx(0.28)  # 280 of 1000 bytes at step 28
    up = render.panel_series(panels["Service up"], store, [times[-1]], window)
    assert up["prefill prefill:1"][0][1] == 0.0 and up["gateway gateway:1"][0][1] == 1.0


def test_plot_writes_a_png_with_every_panel(tmp_path):
    scrapes = tmp_path / "scrapes.jsonl"
    scrapes.write_text("\n".join(synthetic_scrapes(12)) + "\n")
    out = tmp_path / "dashboard.png"
    assert render.main(["plot", str(scrapes), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_bad_scrape_file_is_a_clear_error():
    with pytest.raises(ValueError, match="scrape line 1: not a scrape record"):
        render.load_scrapes(['{"nope": 1}'])
    with pytest.raises(ValueError, match="no scrapes"):
        render.load_scrapes([""])
