"""Tool plans (tool_choice to grammar, output to call), messages for templates that know tools and for those that do
not, and the tool_calls a ChatRenderer writes, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.generation import ChoiceState, Delta
from crescent.services.gateway.render import ChatRenderer
from crescent.services.gateway.schema import ChatCompletionRequest, ChatMessage
from crescent.services.gateway.tools import ToolPlan, plan_tools, template_messages

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


def test_none_has_no_grammar_and_auto_is_refused():
    assert plan_tools(_body(tools=TOOLS, tool_choice="none")).grammar() == ""
    assert plan_tools(_body()) is None
    with pytest.raises(ApiError) as err:
        plan_tools(_body(tools=TOOLS))
    assert err.value.body()["error"]["param"] == "tool_choice"


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
