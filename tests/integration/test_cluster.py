"""The whole cluster as separate processes (conductor, kvstore, prefill, 2 decode, gateway) with a tiny model,
driven through the official openai client. One cluster for the module; the decode-crash test runs last."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import httpx
import openai
import pytest

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from tests.integration.real_cluster import TINY_NAME, launch, logs_tail, scrape

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    plan, group = launch(tmp, decode=2, conductor={"max_queue_per_instance": 3},
                         gateway={"max_model_len": MAX_MODEL_LEN})
    yield plan, group, tmp
    group.stop()


@pytest.fixture(scope="module")
def client(cluster):
    plan, _, _ = cluster
    return openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)


def _chat(client, text: str, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": text}], **kw)


def test_front_service_processes_never_load_torch(client, cluster):
    """gateway, conductor and kvstore serve a request without torch in the process: no libtorch is mapped."""
    _, group, _ = cluster
    assert _chat(client, "hi", max_tokens=2).choices[0].message.content is not None
    maps = {c.name: Path(f"/proc/{c.proc.pid}/maps").read_text() for c in group.children}
    for name, text in maps.items():
        front = name.split("-")[0] in ("gateway", "conductor", "kvstore")
        assert ("libtorch" in text) != front, f"{name}: libtorch {'mapped' if front else 'missing'}"


def test_the_runs_services_require_its_internal_token(client, cluster):
    """The services of one run share a random internal token: the traffic of these tests carries it, a stranger's
    call does not get in."""
    import grpc

    from crescent.services.common.auth import sync_channel

    plan, _, _ = cluster
    assert len(plan.internal_token) >= 32
    for token, expected in (("", grpc.StatusCode.UNAUTHENTICATED), (plan.internal_token, None)):
        with sync_channel(plan.conductor_address, token, [("grpc.enable_http_proxy", 0)]) as channel:
            try:
                listed = conductor_pb2_grpc.ConductorStub(channel).ListInstances(
                    conductor_pb2.ListInstancesRequest(), timeout=5).instances
                code = None
            except grpc.RpcError as err:
                code = err.code()
        assert code == expected
    assert len(listed) >= 3  # prefill, decode and the kvstore registered with the token


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [TINY_NAME]


def test_chat_streaming_matches_non_streaming(client):
    full = _chat(client, "Tell me about the moon.", max_tokens=12)
    chunks = list(_chat(client, "Tell me about the moon.", max_tokens=12, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason] and reasons[0] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 5


def test_completions_max_tokens_one_and_stop(client):
    one = client.completions.create(model=TINY_NAME, prompt="The quick brown fox", max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    ref = client.completions.create(model=TINY_NAME, prompt="The quick brown fox", max_tokens=8, temperature=0)
    text = ref.choices[0].text
    if len(text) >= 3:  # stop at a string the greedy output is known to contain
        stop = text[2:3] if text[2:3].strip() else text[1:3]
        cut = client.completions.create(model=TINY_NAME, prompt="The quick brown fox", max_tokens=8,
                                        temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_min_tokens_holds_off_a_stop_string(client):
    kw = {"model": TINY_NAME, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**kw).choices[0].text
    assert text
    stopped = client.completions.create(**kw, stop=[text[0]])  # the greedy output's very first character
    assert stopped.choices[0].text == "" and stopped.usage.completion_tokens == 1
    held = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "min_tokens": 5}}, stop=[text[0]])
    assert held.usage.completion_tokens >= 5 and held.choices[0].text.startswith(text[0])


def test_tokenize_counts_what_the_completion_counts(client, cluster):
    url = cluster[0].gateway_url
    prompt = "The quick brown fox, héllo 👋"
    tok = httpx.post(url + "/tokenize", json={"model": TINY_NAME, "prompt": prompt}, timeout=30, trust_env=False)
    assert tok.status_code == 200 and tok.json()["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(url + "/detokenize", json={"tokens": tok.json()["tokens"]}, timeout=30, trust_env=False)
    assert back.json() == {"prompt": prompt}
    done = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=1)
    assert done.usage.prompt_tokens == tok.json()["count"]
    messages = [{"role": "user", "content": prompt}]
    chat_tok = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30, trust_env=False).json()
    assert _chat(client, prompt, max_tokens=1).usage.prompt_tokens == chat_tok["count"]


def test_n_two_choices_with_seed(client):
    kw = {"max_tokens": 4, "n": 2, "seed": 3, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    reply = _chat(client, "Say something.", **kw)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 8  # both choices, 4 tokens each; the prompt counted once
    again = _chat(client, "Say something.", **kw)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]


def test_errors(client, cluster):
    plan = cluster[0]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        _chat(client, "x", max_tokens=-1)
    assert bad.value.body["type"] == "invalid_request_error"
    r = httpx.post(plan.gateway_url + "/v1/completions", trust_env=False, timeout=30,
                   json={"model": TINY_NAME, "prompt": [1] * (MAX_MODEL_LEN + 10)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_shared_prefix_is_loaded_not_recomputed_and_output_unchanged(client, cluster):
    plan, _, tmp = cluster
    workers = plan.metrics_urls("prefill") + plan.metrics_urls("decode")
    store = plan.metrics_urls("kvstore")
    prefix = list(range(1000, 1000 + 96))  # 6 full blocks
    a, b = prefix + [7, 8, 9], prefix + [11, 12, 13, 14]
    hits0 = scrape(workers, "crescent_worker_kvstore_hit_tokens_total")
    prefix0 = scrape(plan.metrics_urls("prefill"), "crescent_worker_prefix_cache_hits_total")
    gets0 = scrape(store, "crescent_kvstore_operations_total", {"op": "get", "result": "hit"})
    client.completions.create(model=TINY_NAME, prompt=a, max_tokens=4, temperature=0)
    out_b = client.completions.create(model=TINY_NAME, prompt=b, max_tokens=6, temperature=0)
    time.sleep(1.2)  # worker counters move with their heartbeat (0.5 s)
    assert out_b.usage.prompt_tokens_details.cached_tokens >= 96  # prefill did not recompute the prefix
    assert scrape(workers, "crescent_worker_kvstore_hit_tokens_total") - hits0 >= 96, logs_tail(tmp)
    assert scrape(plan.metrics_urls("prefill"), "crescent_worker_prefix_cache_hits_total") - prefix0 >= 96
    # the same under vLLM's names and label, for dashboards and endpoint pickers written for vLLM
    assert scrape(plan.metrics_urls("prefill"), "vllm:prefix_cache_hits_total", {"model_name": TINY_NAME}) >= 96
    exported = httpx.get(plan.metrics_urls("decode")[0], timeout=5, trust_env=False).text
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f'{gauge}{{model_name="{TINY_NAME}"}}' in exported, gauge
    assert scrape(workers, "crescent_worker_step_seconds_count") > 0  # the engine's steps are observed
    assert scrape(store, "crescent_kvstore_operations_total", {"op": "get", "result": "hit"}) > gets0
    assert out_b.choices[0].text == _reference(tmp, b, temperature=0, max_tokens=6)


def test_seeded_sampling_across_prefill_and_decode_equals_one_engine(client, cluster):
    """Prefill samples token 0, decode the rest: with a seed the result must equal a single engine's."""
    prompt = list(range(2000, 2040))
    out = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=11,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == _reference(cluster[2], prompt, temperature=1.0, seed=11, max_tokens=8,
                                             ignore_eos=True)


def test_logprobs_through_the_cluster(client):
    reply = _chat(client, "Hi", max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 4
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)  # token 0's comes from prefill


_ENGINES: dict = {}


def _reference(tmp, prompt: list[int], **params) -> str:
    """The same prompt through one in-process engine with nothing cached (the store empty)."""
    from crescent.engine.llm_engine import LLMEngine
    from crescent.engine.sampling_params import SamplingParams
    from crescent.engine.settings import EngineSettings

    if tmp not in _ENGINES:
        _ENGINES[tmp] = LLMEngine.from_settings(EngineSettings(model=str(tmp / TINY_NAME), device="cpu",
                                                               num_kv_blocks=64, enable_prefix_caching=False))
    return _ENGINES[tmp].generate([prompt], SamplingParams(**params))[0].text


def test_client_disconnect_frees_decode_blocks(cluster):
    plan, _, _ = cluster
    decode = plan.metrics_urls("decode")
    cancelled0 = scrape(decode, "crescent_worker_requests_total", {"outcome": "cancelled"})
    body = {"model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", plan.gateway_url + "/v1/completions", json=body, timeout=30, trust_env=False) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        running = scrape(decode, "crescent_worker_requests_running")
        cancelled = scrape(decode, "crescent_worker_requests_total", {"outcome": "cancelled"})
        usage = scrape(decode, "crescent_worker_kv_cache_usage_ratio")
        if running == 0 and cancelled > cancelled0 and usage == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"decode did not free the request: running={running} cancelled={cancelled} usage={usage}")


def test_rejection_is_429_with_retry_after(cluster):
    plan = cluster[0]
    body = {"model": TINY_NAME, "prompt": "Count: one two three", "max_tokens": 48, "ignore_eos": True}

    def post(_):
        return httpx.post(plan.gateway_url + "/v1/completions", json=body, timeout=60, trust_env=False)

    with cf.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(post, range(12)))
    codes = sorted(r.status_code for r in replies)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    rejected = next(r for r in replies if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"


def test_decode_crash_is_dropped_and_traffic_continues(client, cluster):
    plan, group, tmp = cluster
    group.kill("decode-1")
    killed_at = time.monotonic()
    from crescent.services.common.auth import sync_channel

    with sync_channel(plan.conductor_address, plan.internal_token, [("grpc.enable_http_proxy", 0)]) as channel:
        stub = conductor_pb2_grpc.ConductorStub(channel)
        while time.monotonic() - killed_at < 10:
            live = stub.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=5).instances
            if sum(s.instance.role == common_pb2.ROLE_DECODE for s in live) == 1:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the conductor did not drop the killed decode worker\n" + logs_tail(tmp))
    assert time.monotonic() - killed_at < 2.0 + 1.5  # heartbeat timeout + one expiry period + slack
    for i in range(10):
        reply = _chat(client, f"Request number {i}", max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_without_its_store_a_prompt_is_decoded_where_its_kv_is(client, cluster):
    """The kvstore dies (kill -9; nothing restarts it here): prefill cannot store the prompt's KV, so the gateway
    sends the decode to the prefill worker, which holds that KV, instead of having a decode worker compute the prompt
    again. Runs last in this module: the cluster has no store afterwards."""
    plan, group, tmp = cluster
    prefill = plan.metrics_urls("prefill")
    decoded_on_prefill = scrape(prefill, "crescent_worker_generation_tokens_total", {"role": "decode"})
    group.kill("kvstore")
    long_prompt = "Tell me about the sea. " * 12  # several full blocks
    for i in range(3):
        reply = _chat(client, f"{long_prompt} ({i})", max_tokens=4, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length", logs_tail(tmp)
    # prefill samples each first token; the 3 after it were decoded in the prefill worker's process too (its
    # decode service counts them under role="decode")
    assert scrape(prefill, "crescent_worker_generation_tokens_total", {"role": "decode"}) - decoded_on_prefill >= 9
