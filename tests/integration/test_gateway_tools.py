"""tool_choice "auto" through a real gateway (uvicorn on loopback) and the official openai client: the fake decode
worker "generates" crafted model output one character per token, the gateway's Hermes parser turns it into
tool_calls or content, whole and streamed (the client's stream helper accumulates the deltas into the same calls).
The real default model's own calls are the e2e test's (tests/e2e/test_tool_auto.py)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.fake_cluster import CharTokenizer
from tests.integration.gateway_server import MODEL, running_gateway

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(fake_cluster):
    # one token per character: the tools' descriptions make a prompt of about a thousand
    with running_gateway(fake_cluster.address, CharTokenizer(), max_model_len=4096) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10)


@pytest.fixture(autouse=True)
def _reset(fake_cluster):
    yield
    fake_cluster.reset()


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, **kw)


def test_a_call_in_the_output_is_a_tool_call(client, fake_cluster):
    fake_cluster.reply = f"<tool_call>\n{WEATHER}\n</tool_call>"
    done = _chat(client)  # no tool_choice: tools alone mean "auto"
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake_cluster.sampling[-1].response_format == ""  # "auto" constrains nothing


def test_text_without_a_call_is_content(client, fake_cluster):
    fake_cluster.reply = "It is sunny <today>."
    choice = _chat(client, tool_choice="auto").choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == \
        ("stop", "It is sunny <today>.", None)
    stream = _chat(client, tool_choice="auto", stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "It is sunny <today>."
    assert all(not c.delta.tool_calls for c in chunks) and chunks[-1].finish_reason == "stop"


def test_streamed_calls_come_name_first_then_argument_fragments(client, fake_cluster):
    fake_cluster.reply = f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n" \
                         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    chunks = [c.choices[0] for c in _chat(client, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "Let me check.\n"
    deltas = [d for c in chunks for d in c.delta.tool_calls or []]
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.function.name, d.type) for d in firsts] == [(0, "get_weather", "function"),
                                                                    (1, "get_time", "function")]
    assert all(d.function.name is None for d in deltas if not d.id)
    weather_args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert json.loads(weather_args) == {"city": "Paris"}
    assert sum(1 for d in deltas if d.index == 0) > 3  # fragments as they come, not one piece at the end
    assert chunks[-1].finish_reason == "tool_calls"
    assert sum(1 for c in chunks if c.finish_reason) == 1


def test_the_clients_stream_helper_accumulates_the_same_calls_as_a_whole_answer(client, fake_cluster):
    fake_cluster.reply = f"<tool_call>[{WEATHER}, {{\"name\": \"get_time\", \"arguments\": {{}}}}]</tool_call>"
    whole = _chat(client).choices[0].message
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=TOOLS) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    got = [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls]
    assert got == [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_parallel_tool_calls_false_keeps_the_first_call(client, fake_cluster):
    fake_cluster.reply = f"<tool_call>{WEATHER}</tool_call><tool_call>{WEATHER}</tool_call>"
    assert len(_chat(client, parallel_tool_calls=False).choices[0].message.tool_calls) == 1
    assert len(_chat(client).choices[0].message.tool_calls) == 2


def test_a_call_cut_by_max_tokens_finishes_with_length(client, fake_cluster):
    fake_cluster.reply = f"<tool_call>{WEATHER}</tool_call>"
    choice = _chat(client, max_tokens=40).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls[0].function.name == "get_weather"


def test_auto_is_a_400_naming_the_setting_when_no_parser_is_set(fake_cluster):
    with running_gateway(fake_cluster.address, CharTokenizer(), max_model_len=4096, tool_call_parser="none") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10)
        with pytest.raises(openai.BadRequestError) as err:
            _chat(client)
        assert err.value.body["param"] == "tool_choice" and "--tool-call-parser" in err.value.body["message"]
        assert _chat(client, tool_choice="none").choices[0].message.tool_calls is None


def test_each_of_n_choices_has_its_own_calls(client, fake_cluster):
    fake_cluster.reply = f"Hm.<tool_call>{WEATHER}</tool_call>"
    chunks = [c.choices[0] for c in _chat(client, n=2, stream=True) if c.choices]
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        deltas = [d for c in mine for d in c.delta.tool_calls or []]
        assert "".join(c.delta.content or "" for c in mine) == "Hm."
        assert [d.function.name for d in deltas if d.id] == ["get_weather"]
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
        assert [c.finish_reason for c in mine if c.finish_reason] == ["tool_calls"]
    whole = _chat(client, n=2).choices
    assert [c.message.content for c in whole] == ["Hm.", "Hm."]
    assert all(c.message.tool_calls[0].function.name == "get_weather" for c in whole)
