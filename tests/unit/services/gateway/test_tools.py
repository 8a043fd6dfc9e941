"""Tool plans (tool_choice to grammar or parser, output to call), messages for templates that know tools and for those that do
not, and the tool_calls a ChatRenderer writes, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.generation import ChoiceState, Delta
from crescent.services.gateway.render import ChatRenderer
from crescent.services.gateway.schema import ChatCompletionRequest, ChatMessage
from crescent.services.gateway.tools import ToolPlan, auto_parser, plan_tools, template_messages

PARAMS = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "noop"}}]


def _body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_required_grammar_accepts_exactly_calls_of_the_tools():
    plan = plan_tools(_body(tools=TOOLS, tool_choice="required"))
    fmt = json.loads(plan.grammar())
    assert fmt["type"] == "json_schema"
    jsonschema.validate({"name": "search", "arguments": {"q": "x"}}, fmt["schema"])
    jsonschema.validate({"name": "noop", "arguments": {}}, fmt["schema"])
    for bad in ({"name": "search", "arguments": {}}, {"name": "other", "arguments": {}}, {"name": "noop"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, fmt["schema"])
    assert plan.call_of('{"name": "search", "arguments": {"q": "x"}}') == ("search", '{"q": "x"}')


def test_named_choice_grammar_is_the_functions_parameters():
    plan = plan_tools(_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}}))
    assert json.loads(plan.grammar())["schema"] == PARAMS
    assert plan.call_of('{"q": "x"}') == ("search", '{"q": "x"}')


def test_none_has_no_grammar_and_auto_is_refused_without_a_parser():
    assert plan_tools(_body(tools=TOOLS, tool_choice="none")).grammar() == ""
    assert plan_tools(_body()) is None
    for body in (_body(tools=TOOLS), _body(tools=TOOLS, tool_choice="auto")):
        with pytest.raises(ApiError) as err:
            plan_tools(body, parser="")
        assert err.value.body()["error"]["param"] == "tool_choice"
        assert "--tool-call-parser" in err.value.body()["error"]["message"]


def test_auto_is_the_default_with_tools_and_has_no_grammar():
    plan = plan_tools(_body(tools=TOOLS), parser="hermes")
    assert (plan.choice, plan.parser, plan.max_calls, plan.grammar()) == ("auto", "hermes", 0, "")
    assert plan.calls and not plan.forced
    assert plan_tools(_body(tools=TOOLS, tool_choice="auto", parallel_tool_calls=False), "hermes").max_calls == 1


HERMES_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"


@pytest.mark.parametrize("setting, template, parser", [
    ("", None, "hermes"), ("", "{{ messages }}", "hermes"), ("", HERMES_TEMPLATE, "hermes"),
    ("", "{% if tools %}[TOOL_CALLS]{% endif %}", ""), ("none", None, ""), ("hermes", "{{ tools }}", "hermes")],
    ids=str)
def test_the_auto_parser_follows_the_setting_then_the_template(setting, template, parser):
    """A template that does not know tools gets Hermes instructions from the gateway; one that knows them writes
    its own format, which only a template that speaks of <tool_call> makes Hermes'."""
    assert auto_parser(setting, template) == parser


@pytest.mark.parametrize("choice", [{"type": "function", "function": "search"}, {"type": "function"},
                                    {"type": "tool", "function": {"name": "search"}}], ids=str)
def test_malformed_named_choices_are_400(choice):
    with pytest.raises(ApiError) as err:
        plan_tools(_body(tools=TOOLS, tool_choice=choice))
    assert err.value.status == 400 and err.value.body()["error"]["param"] == "tool_choice"


def _history() -> list[ChatMessage]:
    return [ChatMessage(role="user", content="find x"),
            ChatMessage(role="assistant", tool_calls=[{"id": "c1", "type": "function",
                                                       "function": {"name": "search", "arguments": '{"q": "x"}'}}]),
            ChatMessage(role="tool", tool_call_id="c1", content="found")]


def test_messages_for_a_template_without_tools_carry_them_as_text():
    plan = ToolPlan([t["function"] for t in TOOLS], "required")
    msgs = template_messages(_history(), plan, native=False)
    assert msgs[0]["role"] == "system" and '"name":"search"' in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {"name": "search", "arguments": {"q": "x"}}
    assert msgs[3] == {"role": "tool", "content": "found", "tool_call_id": "c1"}


def test_auto_asks_a_template_without_tools_for_hermes_calls_and_shows_earlier_calls_so():
    plan = ToolPlan([t["function"] for t in TOOLS], "auto", "hermes")
    msgs = template_messages(_history(), plan, native=False)
    assert "<tools>" in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
    assert '"name": "search"' in msgs[0]["content"]
    call = msgs[2]["content"]
    assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    assert json.loads(call.split("\n")[1]) == {"name": "search", "arguments": {"q": "x"}}


def test_messages_for_a_template_with_tools_keep_tool_calls_structured():
    msgs = template_messages(_history(), ToolPlan([t["function"] for t in TOOLS], "none"), native=True)
    assert len(msgs) == 3
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "search", "arguments": {"q": "x"}}


def test_renderer_writes_a_named_call_whole_and_streamed():
    plan = ToolPlan([t["function"] for t in TOOLS], "search")
    whole = ChatRenderer(None, None, plan).full_choice(ChoiceState(0, 3, ['{"q": "x"}'], finish_reason="stop"))
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert whole["message"]["tool_calls"][0]["function"] == {"name": "search", "arguments": '{"q": "x"}'}
    r = ChatRenderer(None, None, plan)
    parts = [r.chunk_choice(Delta(0, [1], t, [], f)) for t, f in (('{"q', None), ('": "x"}', "stop"))]
    first, second = (p["delta"]["tool_calls"][0] for p in parts)
    assert first["id"].startswith("call_") and first["function"] == {"name": "search", "arguments": '{"q'}
    assert second == {"index": 0, "function": {"arguments": '": "x"}'}}
    assert parts[1]["finish_reason"] == "tool_calls"


def test_renderer_sends_a_required_call_once_it_is_whole():
    r = ChatRenderer(None, None, ToolPlan([t["function"] for t in TOOLS], "required"))
    assert r.chunk_choice(Delta(0, [1], '{"name": "noop", ', [], None))["delta"] == {}
    last = r.chunk_choice(Delta(0, [1], '"arguments": {}}', [], "stop"))
    assert last["delta"]["tool_calls"][0]["function"] == {"name": "noop", "arguments": "{}"}


def _auto_renderer() -> ChatRenderer:
    return ChatRenderer(None, None, ToolPlan([t["function"] for t in TOOLS], "auto", "hermes"))


def test_auto_renders_text_as_content_and_calls_as_tool_calls_whole():
    text = ChoiceState(0, 3, ["Hello <tools> there"], finish_reason="stop")
    assert _auto_renderer().full_choice(text)["message"] == {"role": "assistant", "content": "Hello <tools> there"}
    call = ChoiceState(0, 3, ['Sure.<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'],
                       finish_reason="stop")
    whole = _auto_renderer().full_choice(call)
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Sure."
    (tool_call,) = whole["message"]["tool_calls"]
    assert tool_call["id"].startswith("call_") and tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "search", "arguments": '{"q": "x"}'}


def test_auto_streams_the_name_first_then_arguments_and_finishes_with_tool_calls():
    r = _auto_renderer()
    assert r.opening(1)[0]["delta"] == {"role": "assistant", "content": ""}
    text = '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
    pieces = [text[:25], text[25:40], text[40:]]
    parts = [r.chunk_choice(Delta(0, [1], t, [], "stop" if i == 2 else None)) for i, t in enumerate(pieces)]
    deltas = [d for p in parts for d in p["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "search" and deltas[0]["id"].startswith("call_")
    assert all("id" not in d and "name" not in d["function"] for d in deltas[1:])
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"q": "x"}
    assert [p["finish_reason"] for p in parts] == [None, None, "tool_calls"]
    assert all("content" not in p["delta"] for p in parts)


def test_auto_streams_plain_text_as_content_and_keeps_stop():
    r = _auto_renderer()
    parts = [r.chunk_choice(Delta(0, [1], t, [], f)) for t, f in (("Hi <to", None), ("day", "stop"))]
    assert [p["delta"] for p in parts] == [{"content": "Hi "}, {"content": "<today"}]
    assert parts[-1]["finish_reason"] == "stop"
