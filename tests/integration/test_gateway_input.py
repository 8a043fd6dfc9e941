"""The gateway's input handling (issues #14, #17): every bad input is a 4xx with OpenAI error JSON on a connection
that stays open; fields that would change the output are applied or refused by name; limits hold.

A real uvicorn gateway on loopback in front of the fake conductor/prefill/decode gRPC servers (no model).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration.fake_cluster import REPLY, CharTokenizer
from tests.integration.gateway_server import MODEL, running_gateway

BODY_LIMIT = 64 << 10
ORIGIN = "https://ui.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def base_url(fake_cluster):
    with running_gateway(fake_cluster.address, CharTokenizer(), max_body_bytes=BODY_LIMIT, max_prompts=4,
                         cors_allow_origins=[ORIGIN]) as url:
        yield url


@pytest.fixture()
def http(base_url):
    """One keep-alive connection per test: a reset shows up as a transport error on the next request."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def _post_raw(http: httpx.Client, path: str, raw_json: str) -> httpx.Response:
    return http.post(path, content=raw_json.encode(), headers={"content-type": "application/json"})


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers.get("connection") != "close"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _still_open(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("field, value", [("top_k", 2**31), ("min_tokens", 2**32), ("max_tokens", 2**32),
                                          ("n", 10**30), ("seed", 2**63), ("logprobs", 21)], ids=str)
def test_integers_beyond_protobuf_range_are_400(http, field, value):
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 2, field: value}
    _error(http.post("/v1/completions", json=body), 400, param=field)
    _still_open(http)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_floats_are_400(http, raw):
    for field in ("temperature", "top_p", "presence_penalty", "length_penalty"):
        _error(_post_raw(http, "/v1/completions", f'{{"model": "fake-model", "prompt": "a", "{field}": {raw}}}'), 400,
               param=field)
    _still_open(http)


def test_largest_top_k_and_negative_seed_are_served(http, fake_cluster):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2, "top_k": 2**31 - 1,
                                           "seed": -1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == REPLY[:2]
    assert fake_cluster.seeds[-1] == 2**64 - 1


@pytest.mark.parametrize("raw", [
    '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
    '{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
    '{"model": "fake-\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
], ids=["content", "stop", "part", "model", "key"])
def test_lone_surrogates_are_400_on_an_open_connection(http, raw):
    _error(_post_raw(http, "/v1/chat/completions", raw), 400)
    _still_open(http)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"", b"{", b"[]", b"null", b"[" * 30_000 + b"]" * 30_000],
                         ids=["not-utf8", "empty", "truncated", "list", "null", "nested-30k"])
def test_bodies_that_are_no_json_object_are_400(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    _error(r, 400, param=None)
    assert r.json()["error"]["param"] is None
    _still_open(http)


def test_a_surrogate_pair_is_one_character_and_served(http):
    raw = '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert _post_raw(http, "/v1/chat/completions", raw).status_code == 200


def test_unknown_field_is_400_naming_it(http):
    err = _error(http.post("/v1/chat/completions", json={**CHAT, "frobnicate": 1}), 400, param="frobnicate")
    assert "Unrecognized request argument" in err["message"]
    _error(http.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, param="top_logprobs")


@pytest.mark.parametrize("field, value", [
    ("best_of", 2), ("min_p", 0.1), ("echo", True), ("guided_regex", "a+"), ("use_beam_search", True),
    ("skip_special_tokens", False)], ids=str)
def test_output_changing_fields_are_refused_by_name(http, field, value):
    _error(http.post("/v1/chat/completions", json={**CHAT, field: value}), 400, param=field,
           code="unsupported_parameter")


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
     "messages.0.content.0"),
], ids=["image"])
def test_unsupported_message_contents_are_refused_by_name(http, message, param):
    body = {**CHAT, "messages": [message, {"role": "user", "content": "x"}]}
    _error(http.post("/v1/chat/completions", json=body), 400, param=param, code="unsupported_parameter")


TOOL = {"type": "function", "function": {"name": "w", "parameters": {"properties": {"c": {"type": "string"}}}}}


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools.0"),
    ({"tools": [TOOL, TOOL], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
      "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages.0.tool_calls")], ids=str)
def test_bad_tool_requests_are_400_naming_the_field(http, extra, param):
    _error(http.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param=param)


def test_a_named_tool_choice_sends_its_parameters_as_the_grammar(http, fake_cluster):
    body = {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "w"}}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    fmt = json.loads(fake_cluster.sampling[-1].response_format)
    assert fmt == {"type": "json_schema", "schema": TOOL["function"]["parameters"]}
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("tool_calls", "length")
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "w" and call["id"].startswith("call_")
    assert choice["message"]["content"] is None


def test_penalties_and_logit_bias_reach_the_workers(http, fake_cluster):
    body = {**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
            "logit_bias": {"5": 10, "104": -100}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    sent = fake_cluster.sampling[-1]
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, -1.0)
    assert sent.repetition_penalty == pytest.approx(1.2) and dict(sent.logit_bias) == {5: 10.0, 104: -100.0}
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    plain = fake_cluster.sampling[-1]
    assert (plain.presence_penalty, plain.repetition_penalty, dict(plain.logit_bias)) == (0.0, 1.0, {})


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"x": 1}), ("logit_bias", {"-3": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"5": "a"}),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0)], ids=str)
def test_steering_values_out_of_range_are_400_naming_the_field(http, field, value):
    _error(http.post("/v1/chat/completions", json={**CHAT, field: value}), 400, param=field)
    _still_open(http)


def test_response_format_travels_as_json_for_the_workers(http, fake_cluster):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                             "strict": True}}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert json.loads(fake_cluster.sampling[-1].response_format) == {"type": "json_schema", "schema": schema}
    assert http.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}}).status_code \
        == 200
    assert json.loads(fake_cluster.sampling[-1].response_format) == {"type": "json_object"}
    assert http.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}}).status_code == 200
    assert fake_cluster.sampling[-1].response_format == ""


@pytest.mark.parametrize("json_schema, param", [
    (None, "response_format.json_schema"), ({"schema": {}}, "response_format.json_schema"),
    ({"name": "x", "schema": []}, "response_format.json_schema.schema"),
    ({"name": "x", "schema": {"type": "nonsense"}}, "response_format.json_schema.schema"),
    ({"name": "x", "schema": {"properties": 3}}, "response_format.json_schema.schema")], ids=str)
def test_bad_json_schemas_are_400_naming_the_field(http, json_schema, param):
    fmt = {"type": "json_schema", "json_schema": json_schema}
    _error(http.post("/v1/chat/completions", json={**CHAT, "response_format": fmt}), 400, param=param)
    _still_open(http)


def test_no_op_values_and_output_neutral_fields_are_served(http):
    body = {**CHAT, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {},
            "repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "user": "u1",
            "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "parallel_tool_calls": False,
            "stream_options": None, "skip_special_tokens": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == REPLY[:3]


def test_vllm_bench_payloads_are_served(http):
    """What `vllm bench serve` sends (openai-completions and openai-chat backends, ignore_eos on)."""
    completions = {"model": MODEL, "prompt": "ab", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 4, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "temperature": 0.0}
    for path, body in (("/v1/completions", completions), ("/v1/chat/completions", chat)):
        r = http.post(path, json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), (path, r.text[:300])


def test_ignore_eos_and_min_tokens_reach_the_workers(http, fake_cluster):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 4, "ignore_eos": True,
                                           "min_tokens": 3})
    assert r.status_code == 200
    sampling = fake_cluster.sampling[-1]
    assert sampling.ignore_eos and sampling.min_tokens == 3 and sampling.max_tokens == 4


def test_over_long_prompt_is_400_context_length_exceeded(http):
    chat = {**CHAT, "messages": [{"role": "user", "content": "y" * 300}]}
    _error(http.post("/v1/chat/completions", json=chat), 400, param="messages", code="context_length_exceeded")


def test_prompt_list_is_capped(http, fake_cluster):
    before = len(fake_cluster.placed)
    _error(http.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 1}), 400,
           param="prompt")
    assert len(fake_cluster.placed) == before  # refused before any placement
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 4, "max_tokens": 1}).status_code == 200


def test_body_over_the_limit_is_413_and_the_connection_stays_usable(http):
    big = {**CHAT, "messages": [{"role": "user", "content": "z" * BODY_LIMIT}]}
    _error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")
    _still_open(http)

    def chunked():  # no Content-Length: the limit is found while reading
        for _ in range(4):
            yield b" " * (BODY_LIMIT // 2)

    _error(http.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    _still_open(http)


def test_cors_preflight_and_headers_on_errors(http):
    pre = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    bad = http.post("/v1/chat/completions", json={**CHAT, "top_k": -5}, headers={"Origin": ORIGIN})
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == ORIGIN
    other = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_tokenize_and_detokenize_round_trip(http):
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "héllo", "return_token_strs": True}).json()
    assert tok["tokens"] == [ord(c) for c in "héllo"] and tok["count"] == 5 and tok["max_model_len"] == 200
    assert tok["token_strs"] == list("héllo")
    with_bos = http.post("/tokenize", json={"prompt": "a", "add_special_tokens": True}).json()
    assert with_bos["tokens"] == [1, ord("a")]
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == [ord(c) for c in "<user>hi\n<assistant>"]
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    _error(http.post("/detokenize", json={"tokens": [0x110000]}), 400, param="tokens")
    _error(http.post("/detokenize", json={"tokens": [-1]}), 400)
    _error(http.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, param="model")
    _error(http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)
    _still_open(http)


class SlowTokenizer(CharTokenizer):
    """Tokenizing takes a while, as a multi-megabyte prompt does."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text.startswith("slow"):
            time.sleep(1.5)
        return super().encode(text, add_special_tokens)


def test_tokenizing_never_blocks_health(fake_cluster):
    with running_gateway(fake_cluster.address, SlowTokenizer()) as url:
        slow = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                kwargs={"json": {"model": MODEL, "prompt": "slow", "max_tokens": 1}, "timeout": 10})
        slow.start()
        time.sleep(0.2)  # the slow request is being tokenized now
        worst = 0.0
        while slow.is_alive():
            start = time.monotonic()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.05)
        slow.join()
    assert worst < 0.5, f"/health took {worst:.2f} s while a prompt was tokenized"


def test_api_keys_from_a_file_and_the_setting(fake_cluster, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated monthly\nkey-from-file\n\nnext-key\n")
    with running_gateway(fake_cluster.address, CharTokenizer(), api_key="key-from-env",
                         api_key_file=str(key_file)) as url, httpx.Client(base_url=url, timeout=10) as http:
        for key in ("key-from-env", "key-from-file", "next-key"):
            r = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"bearer {key}"})
            assert r.status_code == 200, (key, r.text)
        for auth in ("Bearer wrong", "Bearer key-from-fil", "key-from-file", "Basic key-from-file", ""):
            _error(http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": auth}), 401,
                   code="invalid_api_key")
        assert http.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"], ids=["missing", "empty"])
def test_an_unusable_key_file_stops_the_start(tmp_path, content):
    from crescent.services.gateway.server import create_app
    from crescent.services.gateway.settings import GatewaySettings
    from crescent.services.gateway.tokens import PromptEncoder

    key_file = tmp_path / "keys"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises((OSError, ValueError)):
        create_app(GatewaySettings(served_model_name=MODEL, api_key_file=str(key_file)),
                   encoder=PromptEncoder(CharTokenizer(), max_model_len=200))


class BrokenTokenizer(CharTokenizer):
    """A bug stand-in: tokenizing "boom" raises what no handler expects."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text == "boom":
            raise RuntimeError("a bug")
        return super().encode(text, add_special_tokens)


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(fake_cluster):
    with running_gateway(fake_cluster.address, BrokenTokenizer()) as url, httpx.Client(base_url=url, timeout=10) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "boom", "max_tokens": 1})
        err = _error(r, 500)
        assert err["type"] == "server_error" and "RuntimeError" in err["message"]
        port = r.extensions["network_stream"].get_extra_info("client_addr")
        again = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1})
        assert again.status_code == 200
        assert again.extensions["network_stream"].get_extra_info("client_addr") == port  # the same connection
