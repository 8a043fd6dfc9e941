"""10x the measured capacity for 60 s against `crescent up` (the default model, the default admission).

`crescent up` calibrates a cost model for this machine (or reuses the cached one), so the conductor runs the
``predicted`` early rejection with SLOs sized from the calibration. Offered 10x what that model says one prefill and
one decode worker can serve, the cluster must answer the excess with 429 + Retry-After at once, keep the accepted
requests' p99 TTFT within the TTFT SLO, and hold every service's memory flat (within 10%, /proc/PID/status VmRSS).
The client is bounded: a fixed request count, open-loop arrivals, at most ``MAX_IN_FLIGHT`` connections, timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from crescent.services.common.launcher import free_port, http_ok
from crescent.services.conductor.cost_model import CostModel
from tests.e2e.procs import flag_value, service_children

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 420  # a first run on a fresh machine calibrates (seconds on a quiet 2-core CPU; minutes on a busy one)
OVERLOAD = 10.0
DURATION_S = 60.0
MAX_REQUESTS = 2400  # the client's bound: 40 requests/s for 60 s
MAX_IN_FLIGHT = 128
MAX_TOKENS = 8  # short outputs: the accepted requests drain soon after the minute
RSS_WARMUP_S = 15.0  # the baseline: after the KV cache pages and the connection pools are touched
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("overload-logs")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRESCENT_TORCH_THREADS": "1", "CRESCENT_NUM_KV_BLOCKS": "512",
           "CRESCENT_DEVICE": "cpu", "CRESCENT_DATA_DIR": str(tmp_path_factory.mktemp("kvstore"))}
    for name in ("CRESCENT_REJECTION", "CRESCENT_TTFT_SLO_S", "CRESCENT_TBT_SLO_S", "CRESCENT_COST_MODEL_PATH"):
        env.pop(name, None)  # the defaults are what is tested
    proc = subprocess.Popen([sys.executable, "-m", "crescent.cli", "up", "--free-ports", "--port", str(port),
                             "--log-dir", str(log_dir), "--startup-timeout-s", str(STARTUP_S)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    healthy = http_ok(url + "/health")
    deadline = time.monotonic() + STARTUP_S + 60
    while not healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"crescent up did not come up: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.5)
    yield url, proc.pid, log_dir
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)






def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _metric(url: str, name: str, labels: str = "") -> float:
    prefix = name + ("{" + labels + "}" if labels else "")
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Outcome:
    status: int
    ttft_s: float | None = None
    retry_after: str | None = None
    finished: bool = False
    error: str = ""  # the client's exception, when the request failed without an HTTP status


def _capacity_rps(cost: CostModel, prompt_tokens: int, tbt_slo_s: float) -> float:
    """Requests/s one prefill and one decode worker sustain by the calibrated model: the slower of prefill (one
    prompt at a time) and decode (the largest batch whose step keeps the TBT SLO, MAX_TOKENS steps per request)."""
    prefill = 1.0 / cost.prefill_time(prompt_tokens)
    batch = 1
    while batch < 256 and cost.decode_step_time(batch + 1, (batch + 1) * prompt_tokens) \
            <= tbt_slo_s / cost.decode_tail_ratio:
        batch += 1
    decode = batch / (MAX_TOKENS * cost.decode_step_time(batch, batch * prompt_tokens))
    return min(prefill, decode)


def _has_text(line: str) -> bool:
    choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def _one(client: httpx.AsyncClient, model: str, i: int, read_timeout_s: float) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    started = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 timeout=httpx.Timeout(10.0, read=read_timeout_s)) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(r.status_code, retry_after=r.headers.get("retry-after"))
            out = Outcome(200)
            async for line in r.aiter_lines():
                if out.ttft_s is None and line.startswith("data: {") and _has_text(line):
                    out.ttft_s = time.monotonic() - started  # the first token (not the role-only first chunk)
                out.finished = out.finished or line == "data: [DONE]"
            return out
    except httpx.HTTPError as exc:
        return Outcome(-1, error=f"{type(exc).__name__}: {exc}")


async def _overload(url: str, model: str, rate: float, count: int, read_timeout_s: float,
                    pids: dict[str, int]) -> tuple[list[Outcome], dict[str, list[int]]]:
    rss: dict[str, list[int]] = {role: [] for role in pids}
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    t0 = time.monotonic()

    async def sample() -> None:
        while True:
            await asyncio.sleep(5.0)
            if time.monotonic() - t0 >= RSS_WARMUP_S:
                for role, pid in pids.items():
                    rss[role].append(_rss_kib(pid))

    async def paced(client: httpx.AsyncClient, i: int) -> Outcome:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))  # open loop: arrivals do not wait
        async with gate:
            return await _one(client, model, i, read_timeout_s)

    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    sampler = asyncio.create_task(sample())
    try:
        async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as client:
            outcomes = await asyncio.gather(*(paced(client, i) for i in range(count)))
    finally:
        sampler.cancel()
    for role, pid in pids.items():
        rss[role].append(_rss_kib(pid))
    return outcomes, rss


def test_ten_times_capacity_for_a_minute_429s_with_retry_after_slo_kept_memory_flat(cluster):
    url, up_pid, log_dir = cluster
    pids = service_children(up_pid)
    assert {"conductor", "gateway", "prefill", "decode", "kvstore"} <= set(pids), pids
    metrics = f"http://127.0.0.1:{flag_value(pids['conductor'], '--metrics-port')}/metrics"
    cost = CostModel.load(flag_value(pids["conductor"], "--cost-model-path"))
    assert cost.calibrated, cost.source  # crescent up measured (or reused) this machine's model
    ttft_slo = _metric(metrics, "crescent_conductor_slo_seconds", 'kind="ttft"')
    tbt_slo = _metric(metrics, "crescent_conductor_slo_seconds", 'kind="tbt"')
    assert (ttft_slo, tbt_slo) == cost.sized_slos()
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    warm = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Write a sentence about the "
                                                                                   "number 1."}]})
    assert warm.status_code == 200, warm.text
    prompt_tokens = warm.json()["usage"]["prompt_tokens"]
    capacity = _capacity_rps(cost, prompt_tokens, tbt_slo)
    rate = OVERLOAD * capacity
    count = min(MAX_REQUESTS, max(60, round(rate * DURATION_S)))
    rate = count / DURATION_S  # the bound may lower it: say what was offered
    rejected_before = _metric(metrics, "crescent_conductor_placements_total", 'outcome="rejected",policy="cache_aware"')

    started = time.monotonic()
    outcomes, rss = asyncio.run(_overload(url, model, rate, count, ttft_slo + MAX_TOKENS * tbt_slo + 30, pids))
    elapsed = time.monotonic() - started

    ok = [o for o in outcomes if o.status == 200]
    busy = [o for o in outcomes if o.status == 429]
    ttfts = sorted(o.ttft_s for o in ok if o.ttft_s is not None)
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("inf")
    summary = {"capacity_rps": round(capacity, 3), "offered_rps": round(rate, 2), "requests": count,
               "elapsed_s": round(elapsed, 1), "accepted": len(ok), "rejected_429": len(busy),
               "other": sorted({o.status for o in outcomes} - {200, 429}),
               "errors": sorted({o.error for o in outcomes if o.error})[:5],
               "ttft_p50_s": round(ttfts[len(ttfts) // 2], 2) if ttfts else None, "ttft_p99_s": round(p99, 2),
               "ttft_slo_s": ttft_slo, "tbt_slo_s": tbt_slo,
               "retry_after": sorted({o.retry_after for o in busy if o.retry_after}, key=lambda v: int(v)),
               "rss_kib": {role: (v[0], max(v)) for role, v in rss.items()}}
    print("overload:", json.dumps(summary))
    assert busy, summary  # the excess is refused ...
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in busy), summary  # ... saying when to come back
    assert len(ok) >= 0.5 * capacity * DURATION_S, summary  # ... while serving about what the machine can
    assert [o for o in outcomes if o.status not in (200, 429)] == [], summary
    assert all(o.finished and o.ttft_s is not None for o in ok), summary
    assert p99 <= ttft_slo, summary
    for role, values in rss.items():
        assert max(values) <= 1.10 * values[0], (role, values, summary)
    assert _metric(metrics, "crescent_conductor_placements_total",
                   'outcome="rejected",policy="cache_aware"') - rejected_before >= len(busy)
