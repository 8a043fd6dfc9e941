"""The gateway's OpenAI API against fake conductor/prefill/decode gRPC servers (real sockets, no model)."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from crescent.services.common.launcher import free_port
from crescent.services.gateway.server import create_app
from crescent.services.gateway.settings import GatewaySettings
from crescent.services.gateway.tokens import PromptEncoder
from tests.integration.fake_cluster import REPLY, CharTokenizer
from tests.integration.gateway_server import MODEL, running_gateway


@pytest.fixture(scope="module")
def base_url(fake_cluster):
    with running_gateway(fake_cluster.address, CharTokenizer(), api_key="") as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(fake_cluster):
    fake_cluster.reset()


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=10)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_non_streaming_usage_and_finish(client, fake_cluster):
    before = len(fake_cluster.finished)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.choices[0].message.content == REPLY[:5]
    assert reply.choices[0].finish_reason == "length"
    prompt_len = len("<user>hi\n<assistant>")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, 5)
    assert len(fake_cluster.finished) == before + 1 and fake_cluster.finished[-1].ok
    assert fake_cluster.placed[-1].prompt_tokens == prompt_len and fake_cluster.placed[-1].max_tokens == 5
    assert fake_cluster.placed[-1].block_size == 16 and len(fake_cluster.placed[-1].block_hashes) == prompt_len // 16


def test_chat_streaming_role_first_then_one_finish_and_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True}, max_tokens=100)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(REPLY)
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_and_max_tokens_one(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=[","],
                                           max_tokens=50)
    assert reply.choices[0].message.content == "Hello world" and reply.choices[0].finish_reason == "stop"
    one = client.completions.create(model=MODEL, prompt="abc", max_tokens=1)
    assert one.choices[0].text == "H" and one.choices[0].finish_reason == "length"


def test_n_two_seeded_choices_get_distinct_seeds(client, fake_cluster):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, seed=7,
                                           max_tokens=3)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert sorted(fake_cluster.seeds[-2:]) == [7, 8]
    assert reply.usage.prompt_tokens == len("<user>x\n<assistant>") and reply.usage.completion_tokens == 6


def test_completion_logprobs_and_chat_top_logprobs(client):
    comp = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp.tokens == list(REPLY[:3]) and lp.text_offset == [0, 1, 2] and len(lp.top_logprobs[0]) == 2
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == list(REPLY[:2]) and len(content[0].top_logprobs) == 3


def test_errors_are_openai_json(client, base_url):
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=0)
    assert bad.value.status_code == 400 and "messages" in bad.value.body["message"]
    too_long = httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": "y" * 300}, timeout=5)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["param"] == "prompt"
    not_json = httpx.post(base_url + "/v1/chat/completions", content=b"{", timeout=5,
                          headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "error" in not_json.json()


def test_rejection_is_429_with_retry_after(client, base_url, fake_cluster):
    fake_cluster.reject_reason = "queue_full"
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                            "messages": [{"role": "user", "content": "x"}]}, timeout=5)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "queue_full"


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(base_url):
    """httpx (and so the openai client) drops an idle pooled connection after 5 s; uvicorn's default closes it after
    5 s too, and a request sent on it as the server closes fails with a reset (seen under load as ReadError). The
    gateway keeps idle connections longer, so the same connection still answers after the client's expiry."""
    host, port = base_url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        for attempt in range(2):
            if attempt:
                time.sleep(5.5)  # past httpx's keepalive_expiry and uvicorn's default timeout_keep_alive
            conn.sendall(request)
            response = _read_response(conn)
            assert response.startswith(b"HTTP/1.1 200"), (attempt, response[:80])


def _read_response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (headers, then Content-Length bytes of body): a recv may return part of it, and
    the rest must not be taken for the next response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_request_id_echoed_or_generated(base_url):
    r = httpx.get(base_url + "/v1/models", headers={"X-Request-Id": "abc-123"}, timeout=5)
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(base_url + "/v1/models", timeout=5).headers["x-request-id"]) == 32


def test_failure_mid_stream_is_an_sse_error_then_done(base_url, fake_cluster):
    fake_cluster.fail_decode_after = 3
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=10) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert not fake_cluster.finished[-1].ok


def test_client_disconnect_cancels_decode_and_finishes(base_url, fake_cluster):
    fake_cluster.token_delay_s = 0.05
    before = len(fake_cluster.finished)
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=10) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(fake_cluster.finished) == before or not fake_cluster.cancelled):
        time.sleep(0.05)
    assert fake_cluster.cancelled, "decode stream was not cancelled"
    assert len(fake_cluster.finished) == before + 1 and not fake_cluster.finished[-1].ok


REQUEST_METRICS = ("crescent_gateway_requests_total", "crescent_gateway_prompt_tokens_total",
                   "crescent_gateway_generation_tokens_total", "crescent_gateway_requests_in_flight",
                   "crescent_gateway_time_to_first_token_seconds_count", "crescent_gateway_inter_token_latency_seconds_count",
                   "crescent_gateway_e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                   "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count")


def test_every_request_metric_carries_the_served_model_name(client, base_url):
    """Under the gateway's names and vLLM's, every request metric has model_name: the served model, never what a
    client sent (a 404 for another name is counted under the served one: the label stays bounded)."""
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="someone-else", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(base_url + "/metrics", timeout=5).text
    for name in REQUEST_METRICS:
        samples = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert samples, name
        assert all(f'model_name="{MODEL}"' in line for line in samples), samples
    assert 'outcome="not_found"' in text and "someone-else" not in text


def test_bad_token_ids_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[-1, 5], max_tokens=2)


def _app(**overrides):
    from fastapi.testclient import TestClient

    settings = GatewaySettings(served_model_name=MODEL, ready_poll_s=0.05, **overrides)
    return TestClient(create_app(settings, encoder=PromptEncoder(CharTokenizer(), max_model_len=200)))


def test_api_key_is_required_when_set(fake_cluster):
    with _app(api_key="sekret", conductor_address=fake_cluster.address) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        denied = http.post("/v1/chat/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        deadline = time.monotonic() + 5
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == REPLY[:2]


def test_not_ready_is_503_while_the_conductor_is_unreachable():
    with _app(conductor_address=f"127.0.0.1:{free_port()}", rpc_timeout_s=0.5) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and "retry-after" in r.headers


def test_streaming_n_two_gives_each_choice_its_role_text_and_one_finish(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2,
                                                 max_tokens=4, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        roles = [ch for c in chunks for ch in c.choices if ch.index == index and ch.delta.role == "assistant"]
        assert len(roles) == 1
        assert "".join(ch.delta.content or "" for ch in mine) == REPLY[:4]
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["length"]


def test_completions_with_several_prompts_index_choices_prompt_major(client):
    reply = client.completions.create(model=MODEL, prompt=["ab", "abcd"], n=2, max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.text == REPLY[:2] for c in reply.choices)
    assert reply.usage.prompt_tokens == 2 + 4 and reply.usage.completion_tokens == 8
