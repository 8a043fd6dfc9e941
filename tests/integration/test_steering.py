"""Output-steering fields through the real cluster (conductor, kvstore, prefill, decode, gateway as processes,
a tiny random model), driven by the official openai client: penalties and logit_bias change greedy output as
specified, response_format constrains it to valid JSON, tool calls parse as their tools' schemas, echo and
token-id prompts work (issue #17)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.integration.real_cluster import TINY_NAME, launch, logs_tail

PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steering")
    plan, group = launch(tmp, decode=1, gateway={"max_model_len": 512})
    yield plan, tmp
    group.stop()


@pytest.fixture(scope="module")
def client(cluster):
    plan, _ = cluster
    return openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)


def _complete(client, **kw) -> str:
    kw = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
          "extra_body": {"ignore_eos": True, **kw.pop("extra_body", {})}, **kw}
    return client.completions.create(**kw).choices[0].text


def _ids(cluster, text: str) -> list[int]:
    plan, _ = cluster
    r = httpx.post(plan.gateway_url + "/tokenize", json={"model": TINY_NAME, "prompt": text}, timeout=10,
                   trust_env=False)
    return r.json()["tokens"]


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.0), ("frequency_penalty", 2.0),
                                          ("presence_penalty", -2.0), ("repetition_penalty", 3.0)], ids=str)
def test_each_penalty_changes_greedy_output_reproducibly(client, cluster, field, value):
    plain = _complete(client)
    kw = {field: value} if field != "repetition_penalty" else {"extra_body": {field: value}}
    first, again = _complete(client, **kw), _complete(client, **kw)
    assert first == again, logs_tail(cluster[1])
    assert first != plain


def test_positive_presence_penalty_repeats_less_than_a_negative_one(client, cluster):
    distinct = {v: len(set(_ids(cluster, _complete(client, presence_penalty=v)))) for v in (-2.0, 2.0)}
    assert distinct[2.0] > distinct[-2.0]


def test_logit_bias_forces_and_bans_tokens(client, cluster):
    token = _ids(cluster, " moon")[-1]
    forced = _complete(client, max_tokens=6, logit_bias={str(token): 100})
    assert _ids(cluster, forced) == _ids(cluster, " moon" * 6)
    plain_ids = set(_ids(cluster, _complete(client)))
    banned = _complete(client, logit_bias={str(t): -100 for t in plain_ids})
    assert plain_ids.isdisjoint(_ids(cluster, banned))


def test_out_of_vocabulary_logit_bias_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, logit_bias={"99999999": 5})
    assert err.value.body["param"] == "logit_bias"


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    vaccinated: bool


def _chat_kw(**kw) -> dict:
    return {"model": TINY_NAME, "messages": [{"role": "user", "content": "Describe a pet as JSON."}],
            "max_tokens": 80, **kw}


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_parse_with_a_pydantic_model_returns_valid_instances(client, cluster, temperature):
    done = client.chat.completions.parse(response_format=Pet, n=2, seed=5, temperature=temperature, **_chat_kw())
    assert len(done.choices) == 2
    for choice in done.choices:
        assert choice.finish_reason == "stop", (choice.message.content, logs_tail(cluster[1]))
        assert isinstance(choice.message.parsed, Pet)
    if temperature:
        assert done.choices[0].message.content != done.choices[1].message.content


def test_streamed_json_schema_output_is_valid_for_every_choice(client, cluster):
    fmt = {"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema(), "strict": True}}
    stream = client.chat.completions.create(response_format=fmt, n=2, seed=9, temperature=1.0, stream=True,
                                            **_chat_kw())
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"], texts
    for text in texts:
        Pet.model_validate_json(text)


def test_the_stream_helper_parses_a_pydantic_model_for_every_choice(client, cluster):
    with client.chat.completions.stream(response_format=Pet, n=2, seed=21, temperature=1.0, **_chat_kw()) as stream:
        final = stream.get_final_completion()
    assert [c.finish_reason for c in final.choices] == ["stop", "stop"], logs_tail(cluster[1])
    assert all(isinstance(c.message.parsed, Pet) for c in final.choices)


def test_json_object_through_the_cluster(client):
    bias = {str(t): 100 for t in (6150,)}  # "{}" in the SmolLM2 vocabulary: a random model needs a nudge to end
    done = client.chat.completions.create(response_format={"type": "json_object"}, logit_bias=bias, **_chat_kw())
    assert done.choices[0].finish_reason == "stop"
    assert json.loads(done.choices[0].message.content) == {}


def test_a_schema_xgrammar_cannot_compile_is_400(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(response_format=fmt, **_chat_kw())


def test_echo_prepends_the_prompt_streaming_and_not(client, cluster):
    plain = _complete(client, max_tokens=6)
    echoed = _complete(client, max_tokens=6, echo=True)
    assert echoed == PROMPT + plain
    stream = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, n=2,
                                       stream=True, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [PROMPT + plain] * 2


def test_token_ids_as_the_prompt_equal_the_text_prompt(client, cluster):
    ids = _ids(cluster, PROMPT)
    assert _complete(client, prompt=ids, max_tokens=6) == _complete(client, max_tokens=6)
    assert _complete(client, prompt=ids, max_tokens=6, echo=True).startswith(PROMPT)


def test_echo_with_logprobs_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, echo=True, logprobs=1)
    assert err.value.body["param"] == "echo"


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}]
ARGS = {"get_weather": WEATHER, "get_time": TOOLS[1]["function"]["parameters"]}


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_required_tool_call_arguments_parse_as_the_tools_schema(client, cluster, temperature):
    done = client.chat.completions.create(tools=TOOLS, tool_choice="required", n=2, seed=3, temperature=temperature,
                                          **_chat_kw())
    for choice in done.choices:
        assert choice.finish_reason == "tool_calls", (choice, logs_tail(cluster[1]))
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])


def test_named_tool_call_streams_argument_deltas(client, cluster):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(tools=TOOLS, tool_choice=choice, stream=True, **_chat_kw())
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert len(deltas) > 1 and all(d.index == 0 and d.id is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER)


def test_the_stream_helper_accumulates_a_required_call(client):
    with client.chat.completions.stream(tools=TOOLS, tool_choice="required", **_chat_kw()) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])


def test_tool_calls_and_results_in_history_reach_the_model(client, cluster):
    """A conversation that called a tool and got its result: the template renders the call and the result (chat
    and /tokenize alike), and tool_choice "none" answers in plain text."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"}]
    done = client.chat.completions.create(model=TINY_NAME, messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length" and done.choices[0].message.tool_calls is None
    assert done.choices[0].message.content
    plan, _ = cluster
    ids = httpx.post(plan.gateway_url + "/tokenize", json={"model": TINY_NAME, "messages": messages}, timeout=10,
                     trust_env=False).json()["tokens"]
    prompt = httpx.post(plan.gateway_url + "/detokenize", json={"model": TINY_NAME, "tokens": ids}, timeout=10,
                        trust_env=False).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in prompt
    assert "tool\nsunny, 25 C" in prompt
    with_tools = done.usage.prompt_tokens
    assert with_tools > len(ids)  # the tools' descriptions are in the chat prompt too
