"""Why a benchmark's requests failed, from the gateway's Prometheus counters read before and after a run.

`vllm bench serve` counts failed requests but keeps only their error texts, and a 429 says "overloaded" without
which rule refused it. The gateway (services/gateway) counts every API request's outcome
(``crescent_gateway_requests_total{endpoint, outcome}``: ok, rejected = HTTP 429 or 503, error = 5xx and errors
inside a stream, bad_request, not_found, cancelled) and every conductor rejection's reason
(``crescent_gateway_rejections_total{reason}``: ttft_slo, tbt_slo, load, ...); the difference of the two readings is
what that run did to them. The gateway exports no per-status-code counter, so 503s (no instance, not ready) show as
outcome "rejected" without a reason, and 500/502/504 together as outcome "error".
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "crescent_gateway_requests_total"
REJECTIONS = "crescent_gateway_rejections_total"
RESUMES = "crescent_gateway_stream_resumes_total"
COUNTERS = (REQUESTS, REJECTIONS, RESUMES)

Reading = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) -> value, for the counters in COUNTERS."""


def parse(text: str) -> Reading:
    """The COUNTERS samples of a /metrics page (Prometheus text format)."""
    reading: Reading = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                reading[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return reading


def scrape(base_url: str, timeout_s: float = 10.0) -> Reading:
    """The gateway's counters now; raises httpx.HTTPError when /metrics does not answer 200."""
    response = httpx.get(base_url + "/metrics", timeout=timeout_s, trust_env=False)
    response.raise_for_status()
    return parse(response.text)


def _grouped(reading: Reading, name: str, key: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample, labels), value in reading.items():
        if sample == name:
            values = dict(labels)
            label = "/".join(values.get(k, "") for k in key)
            out[label] = out.get(label, 0.0) + value
    return out


def difference(before: Reading, after: Reading) -> dict[str, Any]:
    """What happened between two readings: ``outcomes`` ("endpoint/outcome" -> requests), ``rejections``
    (reason -> requests), ``stream_resumes``; zero entries left out. A counter that went down (the gateway
    restarted in between) is taken from zero, and said so in ``gateway_restarted``."""
    restarted = any(after.get(key, 0.0) < value for key, value in before.items())
    base = {} if restarted else before

    def delta(name: str, key: tuple[str, ...]) -> dict[str, int]:
        now, then = _grouped(after, name, key), _grouped(base, name, key)
        counts = {label: round(value - then.get(label, 0.0)) for label, value in now.items()}
        return {label: n for label, n in sorted(counts.items()) if n}

    out: dict[str, Any] = {"outcomes": delta(REQUESTS, ("endpoint", "outcome")),
                           "rejections": delta(REJECTIONS, ("reason",)),
                           "stream_resumes": sum(delta(RESUMES, ()).values())}
    if restarted:
        out["gateway_restarted"] = True
    return out


def unexplained(failed: int | None, diff: dict[str, Any]) -> int | None:
    """Failed requests (as `vllm bench serve` counts them) the gateway did not count as failed: a client-side
    timeout or a dropped connection. The gateway's counts include the run's warm-up requests, so this is a floor."""
    if failed is None:
        return None
    not_ok = sum(n for label, n in diff["outcomes"].items() if not label.endswith("/ok"))
    return max(0, failed - not_ok)
