"""tool_choice "auto" end to end with the default model (SmolLM2-135M-Instruct, greedy) behind a real agg cluster and
the official openai client: the model calls a tool on its own when the conversation shows it how (one earlier call
and its result, then the same question about another city), and answers in text when a tool does not fit.

Measured, not assumed: with the gateway's Hermes instructions, this model (greedy) answers the second weather
question with ``<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>`` and a greeting
with plain text (and it needs the earlier call: a tiny model does not follow the instructions alone)."""

from __future__ import annotations

import json

import openai
import pytest

from crescent.models.prepare import ensure_default_model
from tests.integration.real_cluster import TINY_NAME, launch, logs_tail

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SHOWN = [{"role": "user", "content": "What is the weather in Berlin?"},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": '{"city": "Berlin"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20 C"},
         {"role": "assistant", "content": "It is sunny and 20 C in Berlin."},
         {"role": "user", "content": "What is the weather in Paris?"}]
GREETING = [{"role": "user", "content": "Hello! How are you?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tool-auto")
    plan, group = launch(tmp, mode="agg", model=ensure_default_model(), timeout_s=240)
    yield plan, tmp
    group.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[0].gateway_url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client, messages, max_tokens=40, **kw):
    return client.chat.completions.create(model=TINY_NAME, messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=max_tokens, **kw)


def test_the_model_calls_the_tool_whole_and_streamed(client, cluster):
    choice = _chat(client, SHOWN).choices[0]
    assert choice.finish_reason == "tool_calls", (choice, logs_tail(cluster[1]))
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    with client.chat.completions.stream(model=TINY_NAME, messages=SHOWN, tools=TOOLS, temperature=0,
                                        max_tokens=40) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls] == \
        [("get_weather", {"city": "Paris"})]


def test_the_model_answers_a_greeting_in_text(client):
    choice = _chat(client, GREETING, max_tokens=12, tool_choice="auto").choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
