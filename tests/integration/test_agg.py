"""Aggregated mode: two `crescent serve worker` processes (prefill and decode in one engine each) behind the same
conductor, kvstore and gateway, checked against a disaggregated cluster serving the same tiny model."""

from __future__ import annotations

import time

import openai
import pytest

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common.auth import sync_channel
from tests.integration.real_cluster import TINY_NAME, launch, logs_tail, scrape


@pytest.fixture(scope="module")
def agg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agg")
    plan, group = launch(tmp, mode="agg", workers=2)
    yield plan, tmp
    group.stop()


@pytest.fixture(scope="module")
def disagg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    plan, group = launch(tmp)
    yield plan
    group.stop()


def _client(plan) -> openai.OpenAI:
    return openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)


def _chat(plan, text: str, **kw):
    return _client(plan).chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": text}],
                                                 temperature=0, **kw)


def test_workers_register_as_aggregated(agg):
    plan, _ = agg
    with sync_channel(plan.conductor_address, plan.internal_token, [("grpc.enable_http_proxy", 0)]) as channel:
        reply = conductor_pb2_grpc.ConductorStub(channel).ListInstances(conductor_pb2.ListInstancesRequest(),
                                                                        timeout=10)
    roles = sorted(s.instance.role for s in reply.instances)
    assert roles == [common_pb2.ROLE_KVSTORE, common_pb2.ROLE_WORKER, common_pb2.ROLE_WORKER]


def test_chat_equals_the_disaggregated_cluster_and_kv_never_leaves_the_worker(agg, disagg):
    plan, tmp = agg
    decode_loads0 = scrape(plan.metrics_urls("worker"), "crescent_worker_kvstore_hit_tokens_total",
                           {"role": "decode"})
    puts0 = scrape(plan.metrics_urls("kvstore"), "crescent_kvstore_operations_total", {"op": "put", "result": "ok"})
    for i, text in enumerate(["Tell me about the moon.", "Write a haiku about rivers and stones, please."]):
        want = _chat(disagg, text, max_tokens=16)
        got = _chat(plan, text, max_tokens=16)
        assert got.choices[0].message.content == want.choices[0].message.content, logs_tail(tmp)
        assert got.usage.completion_tokens == want.usage.completion_tokens
        chunks = list(_chat(plan, text, max_tokens=16, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == want.choices[0].message.content, i
    time.sleep(1.2)  # worker counters move with their heartbeat (0.5 s)
    # each request's decode continued on the blocks its prefill left in the same engine: nothing loaded from the
    # store, while prefill still wrote every prompt's full blocks there for other workers
    assert scrape(plan.metrics_urls("worker"), "crescent_worker_kvstore_hit_tokens_total",
                  {"role": "decode"}) == decode_loads0, logs_tail(tmp)
    assert scrape(plan.metrics_urls("kvstore"), "crescent_kvstore_operations_total",
                  {"op": "put", "result": "ok"}) > puts0


def test_a_shared_prefix_is_reused(agg, disagg):
    plan, tmp = agg
    prefix = list(range(1000, 1000 + 96))  # 6 full blocks
    a, b = prefix + [7, 8, 9], prefix + [11, 12, 13, 14]
    _client(plan).completions.create(model=TINY_NAME, prompt=a, max_tokens=4, temperature=0)
    got = _client(plan).completions.create(model=TINY_NAME, prompt=b, max_tokens=6, temperature=0)
    want = _client(disagg).completions.create(model=TINY_NAME, prompt=b, max_tokens=6, temperature=0)
    assert got.usage.prompt_tokens_details.cached_tokens >= 96, logs_tail(tmp)  # own cache or the store
    assert got.choices[0].text == want.choices[0].text
