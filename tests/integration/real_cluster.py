"""Start a real crescent cluster (separate processes, free ports, a tiny random model) for integration tests."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from crescent.services.common.launcher import ClusterPlan, ServiceGroup, plan_local_cluster, start_cluster

REPO = Path(__file__).resolve().parents[2]
TINY_NAME = "tiny-test"

# Small, fixed resources: 8 engineers share 2 cores; every worker gets one torch thread and a small KV cache.
WORKER_FLAGS = {"torch_threads": 1, "num_kv_blocks": 256, "max_num_seqs": 16, "heartbeat_interval_s": 0.5,
                "device": "cpu"}


def tiny_model(root: Path) -> Path:
    from crescent.models.prepare import make_tiny_model

    folder = root / TINY_NAME
    if not (folder / "config.json").is_file():
        make_tiny_model(folder, layers=2, hidden=64)
    return folder


def launch(tmp: Path, *, decode: int = 1, conductor: dict | None = None, gateway: dict | None = None,
           timeout_s: float = 180.0, mode: str = "disagg", workers: int = 1,
           model: Path | None = None) -> tuple[ClusterPlan, ServiceGroup]:
    """``mode``: "disagg" (a prefill and ``decode`` decode workers) or "agg" (``workers`` aggregated workers).
    ``model``: a model folder to serve instead of the tiny random one (served as TINY_NAME all the same)."""
    from crescent.services.common.launcher import free_port

    model = model or tiny_model(tmp)
    extra = {"prefill": WORKER_FLAGS, "decode": WORKER_FLAGS, "worker": WORKER_FLAGS,
             "conductor": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 2.0, "rejection": "none",
                           **(conductor or {})},
             "kvstore": {"dram_capacity_bytes": 64 << 20, "ssd_capacity_bytes": 0, "data_dir": str(tmp / "ssd"),
                         "heartbeat_interval_s": 0.5},
             "gateway": {"ready_poll_s": 0.2, "request_timeout_s": 60, **(gateway or {})}}
    plan = plan_local_cluster(str(model), TINY_NAME, gateway_port=free_port(), decode=decode, free_ports=True,
                              extra=extra, mode=mode, workers=workers)
    env = {"PYTHONPATH": str(REPO), "CRESCENT_LOG_LEVEL": "info"}
    env.update({k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    group = start_cluster(plan, tmp / "logs", env, timeout_s=timeout_s)
    return plan, group


def scrape(urls: list[str], name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a metric's samples (with these labels) over several /metrics endpoints."""
    total = 0.0
    for url in urls:
        text = httpx.get(url, timeout=5, trust_env=False).text
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+|NaN)$", line)
            if not m:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(got.get(k) == v for k, v in (labels or {}).items()):
                total += float(m.group(2))
    return total


def logs_tail(tmp: Path, lines: int = 30) -> str:
    out = []
    for f in sorted((tmp / "logs").glob("*.log")):
        out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)
