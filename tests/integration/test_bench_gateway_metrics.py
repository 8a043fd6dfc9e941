"""The vs-vLLM benchmark's reading of why requests failed (bench/serving/gateway_metrics.py), against a real
gateway on a loopback port (fake conductor/prefill/decode gRPC servers behind it): 429s by reason, errors, ok."""

from __future__ import annotations

import httpx

from bench.serving import gateway_metrics
from tests.integration.fake_cluster import CharTokenizer
from tests.integration.gateway_server import MODEL, running_gateway


def _complete(base_url: str, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 8, "stream": stream}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=10) as r:
        r.read()
    return r


def test_a_run_s_rejections_and_errors_are_counted_by_reason(fake_cluster):
    fake_cluster.reset()
    with running_gateway(fake_cluster.address, CharTokenizer(), api_key="") as url:
        assert _complete(url).status_code == 200  # before the run: not in its difference
        before = gateway_metrics.scrape(url)
        assert _complete(url, stream=True).status_code == 200
        fake_cluster.reject_reason = "queue_full"
        assert [_complete(url).status_code for _ in range(3)] == [429] * 3
        fake_cluster.reject_reason = ""
        fake_cluster.fail_decode_after = 2
        failed = _complete(url, stream=True)  # 200, then an SSE error event
        assert failed.status_code == 200 and b'"error"' in failed.content
        diff = gateway_metrics.difference(before, gateway_metrics.scrape(url))
    fake_cluster.reset()
    assert diff == {"outcomes": {"completions/error": 1, "completions/ok": 1, "completions/rejected": 3},
                    "rejections": {"queue_full": 3}, "stream_resumes": 0}
    # `vllm bench serve` would count 4 failed: all of them explained
    assert gateway_metrics.unexplained(4, diff) == 0
