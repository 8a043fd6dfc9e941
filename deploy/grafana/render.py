"""Render the crescent Grafana dashboard's panels to a PNG from recorded Prometheus scrapes (no Grafana needed).

1. Record scrapes of the running services (bounded: --count scrapes, --interval seconds apart):
     .venv/bin/python deploy/grafana/render.py collect --out scrapes.jsonl --count 120 --interval 5 \\
         --target gateway=http://127.0.0.1:8000/metrics --target prefill=http://127.0.0.1:9061/metrics ...
2. Draw every panel of deploy/grafana/crescent-dashboard.json from them:
     .venv/bin/python deploy/grafana/render.py plot scrapes.jsonl --out bench/results/dashboard.png

A scrape file is JSON lines: {"t": unix seconds, "target": {"component", "instance", "job"}, "text": the
Prometheus text exposition, or null with "error" when the scrape failed (then `up` is 0 for that target)}.
Queries are evaluated with promql.py (a PromQL subset; rate without extrapolation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "crescent-dashboard.json"
UNITS = {"s": "seconds", "reqps": "requests/s", "percentunit": "ratio", "Bps": "bytes/s", "ops": "ops/s"}


def _load_promql():
    # deploy/grafana is a folder of scripts, not a package: import the sibling by path, once.
    name = "crescent_deploy_grafana_promql"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "promql.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


promql = _load_promql()


def scrape_record(t: float, target: dict[str, str], text: str | None, error: str = "") -> dict[str, Any]:
    record: dict[str, Any] = {"t": t, "target": target, "text": text}
    if error:
        record["error"] = error
    return record


def load_scrapes(lines: list[str]) -> tuple[Any, list[float]]:
    """A SeriesStore of every sample (target labels added, `up` synthesized) and the scrape times."""
    store = promql.SeriesStore()
    times: list[float] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            t, target = float(record["t"]), {str(k): str(v) for k, v in record["target"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"scrape line {number}: not a scrape record ({e})") from e
        times.append(t)
        store.add(t, "up", target, 0.0 if record.get("text") is None else 1.0)
        for family in text_string_to_metric_families(record.get("text") or ""):
            for sample in family.samples:
                store.add(t, sample.name, {**sample.labels, **target}, float(sample.value))
    if not times:
        raise ValueError("no scrapes in the file")
    return store, sorted(times)


def round_starts(times: list[float]) -> list[float]:
    """When each scrape round began. One round scrapes every target a few ms apart, so the gaps inside a round are
    tiny next to the interval between rounds: a round starts after a gap over a tenth of the largest."""
    distinct = sorted(set(times))
    gaps = [b - a for a, b in zip(distinct, distinct[1:], strict=False)]
    if not gaps:
        return distinct
    return [distinct[0]] + [b for a, b in zip(distinct, distinct[1:], strict=False) if b - a > 0.1 * max(gaps)]


def scrape_rounds(times: list[float]) -> int:
    return len(round_starts(times))


def scrape_interval(times: list[float]) -> float | None:
    """Median seconds between round starts; None with a single round."""
    starts = round_starts(times)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return statistics.median(gaps) if gaps else None


def eval_times(times: list[float], rate_window_s: float) -> list[float]:
    """Evaluation instants: one per scrape interval, from the first full rate window to the last scrape."""
    step = scrape_interval(times) or 1.0
    first, last = min(times), max(times)
    start = first + min(rate_window_s, last - first)
    count = int((last - start) / step) + 1
    return [start + i * step for i in range(count)]


def default_rate_window(times: list[float]) -> float:
    """Grafana's $__rate_interval is at least four scrape intervals."""
    interval = scrape_interval(times)
    return 4 * interval if interval else 60.0


def legend(fmt: str, labels: frozenset) -> str:
    text = fmt
    for key, value in labels:
        text = text.replace("{{" + key + "}}", value)
    return text or "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels)) + "}"


def panel_series(panel: dict[str, Any], store: Any, at: list[float], rate_window_s: float) -> dict[str, list]:
    """Legend -> [(t, value)] for each target of a panel, evaluated at every instant."""
    evaluator = promql.Evaluator(store)
    out: dict[str, list] = {}
    for target in panel.get("targets", []):
        query = promql.parse(target["expr"].replace("$__rate_interval", f"{int(rate_window_s * 1000)}ms"))
        for t in at:
            result = evaluator.eval(query, t)
            if not isinstance(result, dict):
                result = {frozenset(): result}
            for labels, value in result.items():
                out.setdefault(legend(target.get("legendFormat", ""), labels), []).append((t, value))
    return out


def plot(dashboard: dict[str, Any], store: Any, times: list[float], out: Path, rate_window_s: float) -> int:
    """Draw every timeseries panel on the dashboard's 24-column grid; returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p.get("type") == "timeseries"]
    rows = sorted({p["gridPos"]["y"] for p in panels})
    fig = plt.figure(figsize=(24, 4.2 * len(rows)))
    grid = fig.add_gridspec(len(rows), 24, hspace=0.55, wspace=3.0)
    at = eval_times(times, rate_window_s)
    t0 = times[0]
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[rows.index(pos["y"]), pos["x"]:pos["x"] + pos["w"]])
        series = panel_series(panel, store, at, rate_window_s)
        for name, points in sorted(series.items()):
            ax.plot([(t - t0) / 60 for t, _ in points], [v for _, v in points], label=name, linewidth=1.2)
        defaults = panel["fieldConfig"]["defaults"]
        for step in defaults["thresholds"]["steps"]:
            if step["value"] is not None:
                ax.axhline(step["value"], color="red", linestyle="--", linewidth=1, label=f"SLO {step['value']:g}")
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        top = defaults.get("max")
        ax.set_ylim(bottom=defaults.get("min"), top=None if top is None else top * 1.05)  # lines at max stay visible
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlim(0, (times[-1] - t0) / 60)  # one time axis for every panel, as on a Grafana dashboard
        ax.set_xlabel("minutes", fontsize=8)
        ax.set_ylabel(UNITS.get(defaults.get("unit", ""), ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{dashboard['title']} - {scrape_rounds(times)} scrape rounds, rate window {rate_window_s:g}s",
                 fontsize=13, y=0.93)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return len(panels)


def collect(targets: dict[str, str], out: Path, count: int, interval_s: float, timeout_s: float = 3.0) -> None:
    """Scrape each target `count` times, `interval_s` apart, appending JSON lines to `out`."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with out.open("a") as f:
        for i in range(count):
            started = time.time()
            for component, url in targets.items():
                target = {"component": component, "instance": url.split("/")[2], "job": component}
                try:
                    with opener.open(url, timeout=timeout_s) as reply:
                        record = scrape_record(time.time(), target, reply.read().decode())
                except OSError as e:
                    record = scrape_record(time.time(), target, None, str(e))
                f.write(json.dumps(record) + "\n")
            f.flush()
            if i + 1 < count:
                time.sleep(max(0.0, interval_s - (time.time() - started)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="record scrapes")
    c.add_argument("--target", action="append", required=True, help="component=URL of its /metrics")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--count", type=int, default=60)
    c.add_argument("--interval", type=float, default=5.0)
    p = sub.add_parser("plot", help="draw the dashboard from recorded scrapes")
    p.add_argument("scrapes", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--rate-window", type=float, default=0.0, help="seconds; 0 = four scrape intervals")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        bad = [t for t in args.target if "=" not in t]
        if bad:
            parser.error(f"--target takes component=URL, got {bad}")
        collect(dict(t.split("=", 1) for t in args.target), args.out, args.count, args.interval)
        return 0
    store, times = load_scrapes(args.scrapes.read_text().splitlines())
    window = args.rate_window or default_rate_window(times)
    drawn = plot(json.loads(args.dashboard.read_text()), store, times, args.out, window)
    print(f"wrote {args.out}: {drawn} panels from {scrape_rounds(times)} scrape rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
