"""Reading why requests failed from the gateway's counters: parse, difference, unexplained failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from bench.serving import gateway_metrics


def _page(outcomes: dict[tuple[str, str], int], reasons: dict[str, int], resumes: int = 0) -> str:
    """A /metrics page with the gateway's counter names, as prometheus_client writes it."""
    reg = CollectorRegistry()
    requests = Counter("crescent_gateway_requests_total", "", ["model_name", "endpoint", "outcome"], registry=reg)
    rejections = Counter("crescent_gateway_rejections_total", "", ["model_name", "reason"], registry=reg)
    resumed = Counter("crescent_gateway_stream_resumes_total", "", ["model_name"], registry=reg)
    other = Counter("crescent_gateway_prompt_tokens_total", "", ["model_name"], registry=reg)
    for (endpoint, outcome), n in outcomes.items():
        requests.labels(model_name="m", endpoint=endpoint, outcome=outcome).inc(n)
    for reason, n in reasons.items():
        rejections.labels(model_name="m", reason=reason).inc(n)
    resumed.labels(model_name="m").inc(resumes)
    other.labels(model_name="m").inc(12345)
    return generate_latest(reg).decode()


def test_difference_counts_outcomes_and_reasons_of_the_run_only():
    before = gateway_metrics.parse(_page({("completions", "ok"): 10, ("chat", "ok"): 3}, {"load": 1}))
    after = gateway_metrics.parse(_page({("completions", "ok"): 30, ("chat", "ok"): 3,
                                         ("completions", "rejected"): 12, ("completions", "error"): 1},
                                        {"load": 1, "ttft_slo": 11}, resumes=2))
    assert not any(name == "crescent_gateway_prompt_tokens_total" for name, _ in after)
    diff = gateway_metrics.difference(before, after)
    assert diff == {"outcomes": {"completions/error": 1, "completions/ok": 20, "completions/rejected": 12},
                    "rejections": {"ttft_slo": 11}, "stream_resumes": 2}
    assert gateway_metrics.unexplained(13, diff) == 0
    assert gateway_metrics.unexplained(15, diff) == 2  # two failures the gateway never saw fail
    assert gateway_metrics.unexplained(None, diff) is None


def test_a_restarted_gateway_counts_from_zero():
    before = gateway_metrics.parse(_page({("completions", "ok"): 50}, {"ttft_slo": 4}))
    after = gateway_metrics.parse(_page({("completions", "ok"): 7}, {}))
    assert gateway_metrics.difference(before, after) == {"outcomes": {"completions/ok": 7}, "rejections": {},
                                                         "stream_resumes": 0, "gateway_restarted": True}


def test_scrape_errors_are_httpx_errors():
    import httpx
    import pytest

    from bench.serving.servers import free_port

    with pytest.raises(httpx.HTTPError):
        gateway_metrics.scrape(f"http://127.0.0.1:{free_port()}", timeout_s=2)
