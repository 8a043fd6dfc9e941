"""render.py with a real Prometheus: it scrapes a live exporter of crescent's metrics on loopback, and the dashboard
panels are drawn from its query_range API (then again from the kept TSDB, Prometheus restarted on it)."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import start_http_server

from crescent.services.common import metrics as m
from tests.unit.deploy.scripts import load

render = load("grafana/render")

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (make system: apt-get install prometheus)")
INTERVAL_S = 1.0
DURATION_S = 8.0
OK_PER_S, REJECTED_PER_S = 20.0, 5.0


def feed(stop: threading.Event) -> None:
    """A steady load: 20 ok and 5 rejected requests/s, first tokens at 0.3 s. Counted by elapsed time, so a busy
    machine that wakes this thread late does not lower the rates."""
    m.CONDUCTOR_INSTANCES.labels(role="decode").set(2)
    m.WORKER_RUNNING.labels(role="decode").set(3)
    last = time.monotonic()
    while not stop.wait(0.1):
        now = time.monotonic()
        m.GATEWAY_REQUESTS.labels(model_name="m", endpoint="chat", outcome="ok").inc(OK_PER_S * (now - last))
        m.GATEWAY_REQUESTS.labels(model_name="m", endpoint="chat", outcome="rejected").inc(REJECTED_PER_S * (now - last))
        m.GATEWAY_TTFT.labels(model_name="m").observe(0.3)
        last = now


@pytest.fixture
def exporter() -> Iterator[str]:
    """The test process' default registry (crescent's metrics) on a free loopback port, fed while it runs."""
    port = render.free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(stop,), daemon=True)
    feeder.start()
    yield f"http://127.0.0.1:{port}/metrics"
    stop.set()
    feeder.join(timeout=5)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def settled(points: list[tuple[float, float]]) -> list[float]:
    """Values once the rate window is full (the last half of the run)."""
    values = [v for _, v in points if not math.isnan(v)]
    return values[len(values) // 2:]


def test_record_then_plot_from_a_real_prometheus(exporter, tmp_path):
    data, dashboard = tmp_path / "prom", json.loads(render.DASHBOARD.read_text())
    run = render.record({"gateway": [exporter]}, data, DURATION_S, INTERVAL_S)
    assert run["end"] - run["start"] >= DURATION_S
    with render.LocalPrometheus(data, render.scrape_config({}, INTERVAL_S)) as prometheus:
        requests = next(p for p in dashboard["panels"] if p["title"] == "Request rate by outcome")
        series = render.panel_series(requests, prometheus.url, run["start"], run["end"], INTERVAL_S)
        # other outcomes can exist in this process' registry (earlier tests in the same run): they do not move
        assert {"ok", "rejected"} <= set(series)
        assert all(v == 0 for name in set(series) - {"ok", "rejected"} for v in settled(series[name]))
        assert settled(series["ok"]) and all(v == pytest.approx(OK_PER_S, rel=0.3) for v in settled(series["ok"]))
        assert all(v == pytest.approx(REJECTED_PER_S, rel=0.3) for v in settled(series["rejected"]))
        ttft = next(p for p in dashboard["panels"] if p["title"] == "Time to first token")
        p50 = render.panel_series(ttft, prometheus.url, run["start"], run["end"], INTERVAL_S)
        # histogram_quantile interpolates inside the (0.2, 0.3] bucket that holds every observation.
        assert all(0.2 < v <= 0.3 for v in settled(next(iter(p50.values()))))
        up = render.query_range(prometheus.url, 'up{component="gateway"}', run["start"], run["end"], INTERVAL_S)
        assert [labels["instance"] for labels, _ in up] == [exporter.split("/")[2]]
    out = tmp_path / "dashboard.png"
    drawn = render.plot_from_data(data, dashboard, out)
    assert drawn == len([p for p in dashboard["panels"] if p["type"] == "timeseries"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


def test_a_bad_query_is_a_clear_error(tmp_path):
    with render.LocalPrometheus(tmp_path / "prom", render.scrape_config({}, INTERVAL_S)) as prometheus:
        with pytest.raises(RuntimeError, match="bad_data"):
            render.query_range(prometheus.url, "sum(rate(x[5m])", 0, 10, 1)


def test_targets_and_scrape_config():
    targets = render.parse_targets(["prefill=http://127.0.0.1:9061/metrics", "prefill=http://127.0.0.1:9062/metrics",
                                    "gateway=http://127.0.0.1:8000/metrics"])
    config = render.scrape_config(targets, 5)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["prefill"]["static_configs"] == [{"targets": ["127.0.0.1:9061", "127.0.0.1:9062"],
                                                  "labels": {"component": "prefill"}}]
    assert config["global"]["scrape_interval"] == "5s"
    for bad in ("prefill", "=http://x/metrics", "prefill=127.0.0.1:9061"):
        with pytest.raises(ValueError, match="component=URL"):
            render.parse_targets([bad])
