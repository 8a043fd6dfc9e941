"""Tool calling: which function the model must call (tool_choice), as a grammar the workers enforce, and the
messages (tools, assistant tool_calls, tool results) as the chat template takes them.

Served: ``tool_choice`` "none" (tools are described, nothing is called), "required" (the output is exactly one
call ``{"name": ..., "arguments": {...}}`` of one of the tools) and a named function (the output is that
function's arguments). Both call modes are a JSON schema grammar, so the arguments always parse and match the
tool's parameters. "auto" (the model decides whether to call) needs a parser for free text and stays a 400.

A chat template that knows tools (it mentions ``tools``) gets them the Hugging Face way (``tools=`` and
``tool_calls`` with dict arguments); one that does not (SmolLM2's) gets them as a system message, and earlier
calls as the JSON the "required" grammar produces, so the model sees calls in the form it is asked to write.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from jsonschema.validators import Draft202012Validator, validator_for

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.schema import ChatCompletionRequest, ChatMessage

MAX_TOOLS = 128  # OpenAI's cap


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)
    """The request's function definitions ({"name", "description", "parameters"})."""
    choice: str = "none"
    """"none", "required", or the name of the function that must be called."""

    @property
    def calls(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> str:
        """The response_format (wire JSON) that makes the output a valid call; "" when nothing is called."""
        if not self.calls:
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


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools and choice, checked (a 400 naming the field); None when it has no tools."""
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
        raise ApiError(400, "Unsupported parameter: tool_choice 'auto' (the default with tools) is not supported by "
                            "this server yet; send 'required', 'none' or a named function",
                       param="tool_choice", code="unsupported_parameter")
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
            m["content"] = (m["content"] + "\n" if m["content"] else "") + "\n".join(
                json.dumps({"name": c["name"], "arguments": c["arguments"]}) for c in calls)
        out.append(m)
    if plan is not None and not native:
        text = 'Functions you can call by answering {"name": <name>, "arguments": <object>}:\n' + \
               "\n".join(json.dumps(t, separators=(",", ":")) for t in plan.tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


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
