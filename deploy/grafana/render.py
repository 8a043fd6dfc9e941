"""Render the crescent Grafana dashboard's panels to a PNG from a real Prometheus (its query_range API; no Grafana).

1. Record: start Prometheus (Debian's `prometheus` package, `make system`) on a free loopback port, its TSDB under
   --data, scraping the services while they run (bounded by --duration-s), then draw every panel:
     .venv/bin/python deploy/grafana/render.py record --data /tmp/prom --duration-s 300 --interval 5 \\
         --target gateway=http://127.0.0.1:8000/metrics --target prefill=http://127.0.0.1:9061/metrics ... \\
         --out bench/results/dashboard.png
2. Redraw later from the kept TSDB (Prometheus restarted on it, scraping nothing), or from any running Prometheus
   (docker-compose's on :9090) over a time range:
     .venv/bin/python deploy/grafana/render.py plot --data /tmp/prom --out dashboard.png
     .venv/bin/python deploy/grafana/render.py plot --prometheus http://127.0.0.1:9090 --start T0 --end T1 --out ...

Each panel's PromQL runs as Prometheus evaluates it for Grafana: `$__rate_interval` is four scrape intervals and
the step is one scrape interval; the model variable is at its default, All.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "crescent-dashboard.json"
RUN_FILE = "crescent-run.json"  # in --data: the recorded time range and scrape interval, for `plot --data`
UNITS = {"s": "seconds", "reqps": "requests/s", "percentunit": "ratio", "Bps": "bytes/s", "ops": "ops/s"}
READY_TIMEOUT_S = 60.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy

Points = list[tuple[float, float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(targets: dict[str, list[str]], interval_s: float) -> dict[str, Any]:
    """Prometheus config: one job per component, labelled `component` as deploy/prometheus/prometheus.yml does."""
    jobs = []
    for component, urls in sorted(targets.items()):
        parts = [urllib.parse.urlsplit(u) for u in urls]
        paths = {p.path or "/metrics" for p in parts}
        if len(paths) != 1:
            raise ValueError(f"{component}: every target of a component needs the same metrics path, got {paths}")
        jobs.append({"job_name": component, "metrics_path": paths.pop(), "scheme": parts[0].scheme or "http",
                     "static_configs": [{"targets": [p.netloc for p in parts], "labels": {"component": component}}]})
    interval = f"{max(1, round(interval_s))}s"
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


class LocalPrometheus:
    """A Prometheus process on a free loopback port, its TSDB under `data`; stopped on exit (TSDB kept)."""

    def __init__(self, data: Path, config: dict[str, Any], binary: str | None = None):
        self.data, self.config = data, config
        self.binary = binary or shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus is not installed: `make system` (Debian's prometheus package)")
        self.url, self.process = "", None

    def __enter__(self) -> LocalPrometheus:
        self.data.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: Prometheus reads this file as is.
        (self.data / "prometheus.yml").write_text(json.dumps(self.config, indent=1))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.data / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.data / 'prometheus.yml'}", f"--storage.tsdb.path={self.data / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: see {self.data}/prometheus.log")
            try:
                with _OPENER.open(f"{self.url}/-/ready", timeout=2.0) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"prometheus not ready after {READY_TIMEOUT_S:g}s: see {self.data}/prometheus.log")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Prometheus flushes its head block and exits
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


    def wait_for_first_scrapes(self, expected: int) -> None:
        """Until every target has been scraped once (Prometheus applies new targets only every 5 s)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with _OPENER.open(f"{self.url}/api/v1/targets?state=active", timeout=5.0) as reply:
                active = json.load(reply)["data"]["activeTargets"]
            if len(active) >= expected and all(t["health"] != "unknown" for t in active):
                return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus had not scraped its {expected} targets after {READY_TIMEOUT_S:g}s")


def query_range(url: str, expr: str, start: float, end: float, step_s: float) -> list[tuple[dict[str, str], Points]]:
    """(labels, [(t, value)]) per series, from Prometheus' /api/v1/query_range."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    try:
        with _OPENER.open(f"{url}/api/v1/query_range?{query}", timeout=30.0) as reply:
            body = json.load(reply)
    except urllib.error.HTTPError as e:  # 400/422: a bad query, explained in the JSON body
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in body["data"]["result"]]


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def panel_series(panel: dict[str, Any], url: str, start: float, end: float, interval_s: float) -> dict[str, Points]:
    """Legend -> [(t, value)] for every target of a panel."""
    out: dict[str, Points] = {}
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__rate_interval", f"{max(1, round(4 * interval_s))}s")
        expr = expr.replace("$model_name", ".*")  # the model variable at its default, All
        for labels, points in query_range(url, expr, start, end, interval_s):
            out.setdefault(legend(target.get("legendFormat", ""), labels), []).extend(points)
    return out


def plot(dashboard: dict[str, Any], url: str, start: float, end: float, interval_s: float, out: Path) -> int:
    """Draw every timeseries panel on the dashboard's 24-column grid; returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p.get("type") == "timeseries"]
    rows = sorted({p["gridPos"]["y"] for p in panels})
    fig = plt.figure(figsize=(24, 4.2 * len(rows)))
    grid = fig.add_gridspec(len(rows), 24, hspace=0.55, wspace=3.0)
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[rows.index(pos["y"]), pos["x"]:pos["x"] + pos["w"]])
        series = panel_series(panel, url, start, end, interval_s)
        for name, points in sorted(series.items()):
            ax.plot([(t - start) / 60 for t, _ in points], [v for _, v in points], label=name, linewidth=1.2)
        defaults = panel["fieldConfig"]["defaults"]
        for step in defaults["thresholds"]["steps"]:
            if step["value"] is not None:
                ax.axhline(step["value"], color="red", linestyle="--", linewidth=1, label=f"SLO {step['value']:g}")
        if not any(not math.isnan(v) for points in series.values() for _, v in points):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        top = defaults.get("max")
        ax.set_ylim(bottom=defaults.get("min"), top=None if top is None else top * 1.05)  # lines at max stay visible
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlim(0, (end - start) / 60)  # one time axis for every panel, as on a Grafana dashboard
        ax.set_xlabel("minutes", fontsize=8)
        ax.set_ylabel(UNITS.get(defaults.get("unit", ""), ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{dashboard['title']} - Prometheus, {(end - start) / 60:.1f} min, scrape interval {interval_s:g}s",
                 fontsize=13, y=0.93)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return len(panels)


def record(targets: dict[str, list[str]], data: Path, duration_s: float, interval_s: float) -> dict[str, float]:
    """Scrape the targets with a local Prometheus for duration_s; returns (and keeps in --data) the time range."""
    config = scrape_config(targets, interval_s)
    with LocalPrometheus(data, config) as prometheus:
        prometheus.wait_for_first_scrapes(sum(len(urls) for urls in targets.values()))
        start = time.time()
        time.sleep(duration_s)
        end = time.time()
    run = {"start": start, "end": end, "interval_s": interval_s}
    (data / RUN_FILE).write_text(json.dumps(run) + "\n")
    return run


def plot_from_data(data: Path, dashboard: dict[str, Any], out: Path) -> int:
    """Restart Prometheus on a recorded TSDB (scraping nothing) and draw the recorded range."""
    run = json.loads((data / RUN_FILE).read_text())
    with LocalPrometheus(data, scrape_config({}, run["interval_s"])) as prometheus:
        return plot(dashboard, prometheus.url, run["start"], run["end"], run["interval_s"], out)


def parse_targets(values: list[str]) -> dict[str, list[str]]:
    targets: dict[str, list[str]] = {}
    for value in values:
        component, sep, url = value.partition("=")
        if not sep or not component or "://" not in url:
            raise ValueError(f"--target takes component=URL of its /metrics, got {value!r}")
        targets.setdefault(component, []).append(url)
    return targets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="scrape with a local Prometheus for a while, then draw")
    r.add_argument("--target", action="append", required=True, help="component=URL of its /metrics (repeatable)")
    r.add_argument("--data", type=Path, required=True, help="folder for Prometheus' TSDB, config and log")
    r.add_argument("--duration-s", type=float, required=True)
    r.add_argument("--interval", type=float, default=5.0, help="scrape interval, seconds (whole, at least 1)")
    p = sub.add_parser("plot", help="draw from a recorded --data folder, or a running Prometheus")
    p.add_argument("--data", type=Path, help="a folder `record` filled")
    p.add_argument("--prometheus", help="URL of a running Prometheus (with --start, --end)")
    p.add_argument("--start", type=float, help="unix seconds")
    p.add_argument("--end", type=float, help="unix seconds")
    p.add_argument("--interval", type=float, default=5.0, help="with --prometheus: its scrape interval")
    for sp in (r, p):
        sp.add_argument("--out", type=Path, required=True)
        sp.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    if args.cmd == "record":
        try:
            targets = parse_targets(args.target)
        except ValueError as e:
            parser.error(str(e))
        run = record(targets, args.data, args.duration_s, args.interval)
        drawn = plot_from_data(args.data, dashboard, args.out)
    elif args.data:
        run, drawn = json.loads((args.data / RUN_FILE).read_text()), plot_from_data(args.data, dashboard, args.out)
    elif args.prometheus and args.start and args.end:
        run = {"start": args.start, "end": args.end, "interval_s": args.interval}
        drawn = plot(dashboard, args.prometheus.rstrip("/"), args.start, args.end, args.interval, args.out)
    else:
        parser.error("plot needs --data, or --prometheus with --start and --end")
    print(f"wrote {args.out}: {drawn} panels over {(run['end'] - run['start']) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
