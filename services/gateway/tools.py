"""Tool calling: which function the model must or may call (tool_choice), as a grammar the workers enforce or a
parser that finds calls in free text, and the messages (tools, assistant tool_calls, tool results) as the chat
template takes them.

``tool_choice`` "none": tools are described, nothing is called. "required": the output is exactly one call
``{"name": ..., "arguments": {...}}`` of one of the tools; a named function: the output is that function's
arguments. Both are a JSON schema grammar, so the arguments always parse and match the tool's parameters.
"auto" (the default when tools are given): the model answers in text or calls tools in its own format, which a
tool-call parser (tool_parsers.py, chosen by the ``tool_call_parser`` setting as vLLM's ``--tool-call-parser``)
turns into tool_calls; a model whose format no parser reads gets a 400 for "auto".

A chat template that knows tools (it mentions ``tools``) gets them the Hugging Face way (``tools=`` and
``tool_calls`` with dict arguments); one that does not (SmolLM2's) gets them as a system message, and earlier
calls in the form the model is asked to write: the JSON the "required" grammar produces, or for "auto" the
Hermes form (``<tool_call>{json}</tool_call>``, the format SmolLM2's and Qwen2's function calling use).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from jsonschema.validators import Draft202012Validator, validator_for

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.schema import ChatCompletionRequest, ChatMessage
from crescent.services.gateway.tool_parsers import END, PARSERS, START, HermesParser

MAX_TOOLS = 128  # OpenAI's cap
HERMES_PROMPT = ("You may call one or more functions to help with the user query. The functions are in "
                 "<tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, answer with a JSON object of "
                 "its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
                 '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
"""How "auto" describes the tools to a template that does not know tools (Hermes' and Qwen2's own wording)."""


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)
    """The request's function definitions ({"name", "description", "parameters"})."""
    choice: str = "none"
    """"none", "auto", "required", or the name of the function that must be called."""
    parser: str = ""
    """"auto": the tool-call parser that reads calls in the output (a name in tool_parsers.PARSERS)."""
    max_calls: int = 0
    """"auto": most calls one answer may make; 0 = any (1 when the client sent parallel_tool_calls=false)."""

    @property
    def calls(self) -> bool:
        """The output may be a tool call (rendered as tool_calls)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """The output must be a call: a grammar makes it one."""
        return self.choice not in ("none", "auto")

    def new_parser(self) -> HermesParser:
        """A parser for one choice's output ("auto")."""
        return PARSERS[self.parser](self.max_calls)

    def grammar(self) -> str:
        """The response_format (wire JSON) that makes the output a valid call; "" unless a call is forced."""
        if not self.forced:
            return ""
        params = {t["name"]: t.get("parameters") or {"type": "object", "properties": {}} for t in self.tools}
        if self.choice != "required":
            return json.dumps({"type": "json_schema", "schema": params[self.choice]})
        one_of = [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                   "required": ["name", "arguments"], "additionalProperties": False} for n, p in params.items()]
        return json.dumps({"type": "json_schema", "schema": {"anyOf": one_of}})

    def call_of(self, text: str) -> tuple[str, str]:
        """(function name, arguments JSON text) of a finished call's output text."""
        if self.choice != "required":
            return self.choice, text
        try:
            call = json.loads(text)
            return call["name"], json.dumps(call["arguments"])
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: hand over what there is
            return "", text


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def auto_parser(setting: str, chat_template: str | None) -> str:
    """The tool-call parser "auto" uses: the ``tool_call_parser`` setting, or when it is "" the one the chat
    template implies: Hermes when the template writes ``<tool_call>`` tags, or when it does not know tools (then
    template_messages asks for Hermes calls itself). "" = no parser fits: "auto" is refused."""
    if setting:
        return "" if setting == "none" else setting
    template = chat_template or ""
    return "hermes" if "tools" not in template or START in template else ""


def plan_tools(body: ChatCompletionRequest, parser: str = "") -> ToolPlan | None:
    """The request's tools and choice, checked (a 400 naming the field); None when it has no tools.
    ``parser``: the tool-call parser for "auto" ("" = "auto" is refused)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if len(body.tools) > MAX_TOOLS:
        raise ApiError(400, f"at most {MAX_TOOLS} tools", param="tools")
    tools = [_function(i, t) for i, t in enumerate(body.tools)]
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool function names must be unique", param="tools")
    if choice in (None, "auto"):
        if not parser:
            raise ApiError(400, "Unsupported parameter: tool_choice 'auto' (the default with tools) needs a "
                                "tool-call parser for this model's output format, and none is set: start the "
                                "gateway with --tool-call-parser (one of " + ", ".join(sorted(PARSERS)) + "), or "
                                "send tool_choice 'required', 'none' or a named function",
                           param="tool_choice", code="unsupported_parameter")
        return ToolPlan(tools, "auto", parser, 1 if body.parallel_tool_calls is False else 0)
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise ApiError(400, f"tool_choice must name one of the tools {names}", param="tool_choice")
        choice = name
    return ToolPlan(tools, choice)


def _function(i: int, tool: dict[str, Any]) -> dict:
    fn = tool.get("function")
    if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or not fn["name"]:
        raise ApiError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}",
                       param=f"tools.{i}")
    params = fn.get("parameters")
    if params is not None:
        try:
            if not isinstance(params, dict):
                raise TypeError("parameters must be a JSON object")
            validator_for(params, default=Draft202012Validator).check_schema(params)
        except Exception as exc:
            raise ApiError(400, f"tools.{i}.function.parameters is not a valid JSON Schema: "
                                f"{str(exc).splitlines()[0]}", param=f"tools.{i}.function.parameters") from exc
    return {k: fn[k] for k in ("name", "description", "parameters") if k in fn}


def template_messages(messages: list[ChatMessage], plan: ToolPlan | None, native: bool) -> list[dict]:
    """Messages as the chat template takes them; ``native``: the template renders tools and tool_calls itself."""
    out = []
    for i, msg in enumerate(messages):
        m: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
        if msg.name:
            m["name"] = msg.name
        if msg.tool_call_id:
            m["tool_call_id"] = msg.tool_call_id
        calls = [_call_dict(c, f"messages.{i}.tool_calls") for c in msg.tool_calls or []]
        if calls and native:
            m["tool_calls"] = [{"type": "function", "id": c["id"], "function": {"name": c["name"],
                                                                                "arguments": c["arguments"]}}
                               for c in calls]
        elif calls:
            hermes = plan is not None and plan.choice == "auto"
            m["content"] = (m["content"] + "\n" if m["content"] else "") + "\n".join(
                _call_text({"name": c["name"], "arguments": c["arguments"]}, hermes) for c in calls)
        out.append(m)
    if plan is not None and not native:
        text = _tools_prompt(plan)
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _tools_prompt(plan: ToolPlan) -> str:
    if plan.choice == "auto":  # json.dumps' own spacing, as Hermes prompts write tools (SmolLM2 follows it better)
        return HERMES_PROMPT.format(tools="\n".join(json.dumps(t) for t in plan.tools))
    return 'Functions you can call by answering {"name": <name>, "arguments": <object>}:\n' + \
        "\n".join(json.dumps(t, separators=(",", ":")) for t in plan.tools)


def _call_text(call: dict, hermes: bool) -> str:
    return f"{START}\n{json.dumps(call)}\n{END}" if hermes else json.dumps(call)


def _call_dict(call: dict[str, Any], param: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "an assistant tool_call needs {'function': {'name': ..., 'arguments': ...}}",
                       param=param)
    args = fn.get("arguments", "{}")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except ValueError as exc:
        raise ApiError(400, f"tool_call arguments are not JSON: {exc}", param=param) from exc
    return {"id": call.get("id", ""), "name": fn["name"], "arguments": parsed}
