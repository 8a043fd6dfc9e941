"""Chat-template parity: the prompts the gateway renders (OpenAI messages -> template_messages -> crescent's
Tokenizer) are the strings transformers' ``apply_chat_template`` renders from the same messages, on the default
model's template (it does not know tools: the gateway writes them as text) and on a Hermes/Qwen2-style tool template
written for this test (tools= with ``tojson``, assistant tool_calls, tool results, loop controls, a ``generation``
block), for many conversations, with and without the generation prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crescent.models.prepare import ensure_default_model
from crescent.models.tokenizer import Tokenizer
from crescent.services.gateway.schema import ChatCompletionRequest
from crescent.services.gateway.tokens import PromptEncoder
from crescent.services.gateway.tools import plan_tools, template_messages

transformers = pytest.importorskip("transformers")  # the bench extra

TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nFunction signatures are in <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nCall one with <tool_call>{"name": <name>, "arguments": <object>}</tool_call>.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
{%- if message.role in ['user', 'system'] %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- generation %}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls | default([]) %}
{%- set fn = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{%- endgeneration %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
{%- if pad_token is defined and documents is none %}{{- '' }}{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & 'soon' in a city (e.g. Zürich, 東京)",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "city": {"type": "string"}},
                   "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop"}}]


def _call(cid: str, name: str, args: dict) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "one user": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "developer": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."},
                   {"role": "user", "content": "Please?"}],
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]}],
    "unicode and markup": [{"role": "user", "content": "<b>é 東京 & 'x' \"y\"</b>\n\ttabs  "}],
    "a tool call and its result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 25 C"},
        {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "And in Zürich?"}],
    "two calls, two results": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Paris and 東京?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            _call("c1", "get_weather", {"city": "Paris", "unit": "C"}),
            _call("c2", "get_weather", {"city": "東京 <&>", "unit": "F"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "snow"}],
    "a call without arguments last": [
        {"role": "user", "content": "Do nothing."},
        {"role": "assistant", "content": "", "tool_calls": [_call("c1", "noop", {})]}],
}


def _folder(tmp: Path, template: str | list | None) -> Path:
    """The default model's tokenizer, with ``template`` as its chat template when given (a list: named ones)."""
    src = ensure_default_model()
    folder = tmp / ("tool-template" if template else "default")
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, folder / name)
    if template:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


DEFAULT_TEMPLATE = Tokenizer.from_dir(ensure_default_model()).chat_template
TEMPLATES = {"default": None, "tool-template": TOOL_TEMPLATE,
             "named": [{"name": "default", "template": DEFAULT_TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}]}
"""named: transformers' named-template form, whose "tool_use" template renders the requests that carry tools."""


@pytest.fixture(scope="module", params=list(TEMPLATES))
def renderers(request, tmp_path_factory):
    """(crescent's encoder, transformers' tokenizer) over one model folder."""
    folder = _folder(tmp_path_factory.mktemp("parity"), TEMPLATES[request.param])
    return PromptEncoder(Tokenizer.from_dir(folder), 8192), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("generation_prompt", [True, False], ids=["gen", "no-gen"])
@pytest.mark.parametrize("choice", [None, "none", "auto"], ids=str)  # "required" renders as "none" does
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_gateway_renders_what_transformers_renders(renderers, name, choice, generation_prompt):
    ours, theirs = renderers
    body = ChatCompletionRequest(model="m", messages=CONVERSATIONS[name], tools=TOOLS if choice else None,
                                 tool_choice=choice)
    plan = plan_tools(body, "hermes")
    messages = template_messages(body.messages, plan, ours.template_knows_tools)
    tools = [{"type": "function", "function": t} for t in plan.tools] \
        if plan is not None and ours.template_knows_tools else None
    expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                          tokenize=False)
    assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools) == \
        expected
    assert ours.chat_ids(messages, generation_prompt, tools) == theirs.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)


def test_the_tool_template_sees_tools_and_calls():
    """The parity above compares something: the tool template renders the tools and the calls it is given."""
    ours = Tokenizer(Tokenizer.from_dir(ensure_default_model()).backend, TOOL_TEMPLATE, eos_token="<|im_end|>")
    body = ChatCompletionRequest(model="m", messages=CONVERSATIONS["two calls, two results"], tools=TOOLS)
    plan = plan_tools(body, "hermes")
    text = ours.apply_chat_template(template_messages(body.messages, plan, True),
                                    tools=[{"type": "function", "function": t} for t in plan.tools])
    assert '"description": "Weather <now> & \'soon\' in a city (e.g. Zürich, 東京)"' in text  # tojson as HF's
    assert '{"name": "get_weather", "arguments": {"city": "東京 <&>", "unit": "F"}}' in text
    assert text.count("<tool_response>") == 2 and text.endswith("<|im_start|>assistant\n")
