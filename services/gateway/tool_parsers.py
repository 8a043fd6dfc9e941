"""Tool-call parsers for ``tool_choice: "auto"``: the model answers in free text, and a parser finds the calls in it.

The model's format decides the parser, as vLLM's ``--tool-call-parser`` does. ``hermes`` reads the format of
Hermes, Qwen2/2.5 and SmolLM2's function-calling prompts: text, then each call as JSON inside tags,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(a JSON list of such objects inside one pair of tags is read as several calls). Text before the first tag is the
answer's content; text after a call is dropped, as vLLM does. Output with no tag is plain content.

A parser serves one choice and works incrementally: ``feed`` takes each new piece of text and returns what can be
sent now, so a stream carries content as it comes, a call's name once it is whole, then its arguments in fragments
(what the OpenAI client accumulates). Content that may be the start of a tag is held back until it is known not to
be one. Text that starts like a call but is not valid JSON is given back as content, as long as no call has been
sent yet (afterwards it is dropped: a sent call cannot be taken back).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"
_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")
_WS = " \t\r\n"


@dataclass
class CallDelta:
    """New output of one tool call: ``name`` on its first delta only, then argument text fragments."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


class Malformed(ValueError):
    """The text after a tag is not (a prefix of) a call object: it is content after all."""


@dataclass
class _CallView:
    name: str | None
    arguments: str
    """The arguments' JSON text so far (its raw text, as the model wrote it)."""


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` calls after optional text; one per choice."""

    def __init__(self, max_calls: int = 0):
        self.max_calls = max_calls
        """0: any number of calls; 1 when the client asked parallel_tool_calls=false."""
        self._text = ""
        self._sent_content = 0
        self._sent_args: list[int] = []  # per call sent: characters of its arguments sent
        self._plain = False  # the text after a tag was not a call: everything is content
        self._last_calls: list[_CallView] = []  # the calls as last parsed (kept when later text breaks them)
        self._memos: dict[int, dict] = {}  # per pair of tags (by its start): where each open JSON value's scan got

    @property
    def called(self) -> bool:
        """At least one call was sent (the choice finishes with "tool_calls")."""
        return bool(self._sent_args)

    def feed(self, text: str) -> ParsedDelta:
        self._text += text
        return self._emit(final=False)

    def finish(self) -> ParsedDelta:
        """The output is complete: release held-back content, close the last call."""
        return self._emit(final=True)

    def parse_all(self, text: str) -> tuple[str, list[CallDelta]]:
        """A whole output at once: its content and its calls (one CallDelta per call)."""
        merged = merge([self.feed(text), self.finish()])
        return merged.content, merged.calls

    def _emit(self, final: bool) -> ParsedDelta:
        content, calls = self._view(final)
        out = ParsedDelta(content[self._sent_content:])
        self._sent_content = len(content)
        for k, call in enumerate(calls):
            if call.name is None:
                break  # a later call cannot start before this one has its name
            if k == len(self._sent_args):
                self._sent_args.append(0)
                out.calls.append(CallDelta(k, call.name))
            new = call.arguments[self._sent_args[k]:]
            if new:
                self._sent_args[k] = len(call.arguments)
                if out.calls and out.calls[-1].index == k:
                    out.calls[-1].arguments += new
                else:
                    out.calls.append(CallDelta(k, arguments=new))
        return out

    def _view(self, final: bool) -> tuple[str, list[_CallView]]:
        """What the text so far says: content that can be sent, and the calls (partial ones included)."""
        text = self._text
        start = -1 if self._plain else text.find(START)
        if start < 0:
            return (text if final else text[:len(text) - _tag_prefix_len(text)]), []
        try:
            calls = self._calls(text, start + len(START), final)
        except Malformed:
            if self.called:
                return text[:start], self._last_calls
            self._plain = True
            return self._view(final)
        self._last_calls = calls[: self.max_calls or None]
        return text[:start], self._last_calls

    def _calls(self, text: str, pos: int, final: bool) -> list[_CallView]:
        """The calls of each pair of tags from ``pos``; a pair that does not hold calls ends them (raised when it
        is the first: then the text is no call at all)."""
        calls: list[_CallView] = []
        while True:
            end = text.find(END, pos)
            body = text[pos:] if end < 0 else text[pos:end]
            try:
                calls += _calls_in(body, end >= 0 or final, self._memos.setdefault(pos, {}))
            except Malformed:
                if not calls:
                    raise
                return calls
            if end < 0:
                return calls
            pos = text.find(START, end + len(END))
            if pos < 0:
                return calls
            pos += len(START)


def merge(parts: list[ParsedDelta]) -> ParsedDelta:
    """Several deltas of one output as one (a call's argument fragments joined)."""
    out = ParsedDelta("".join(p.content for p in parts))
    by_index: dict[int, CallDelta] = {}
    for p in parts:
        for c in p.calls:
            if c.index in by_index:
                by_index[c.index].arguments += c.arguments
            else:
                by_index[c.index] = CallDelta(c.index, c.name, c.arguments)
                out.calls.append(by_index[c.index])
    return out


def _tag_prefix_len(text: str) -> int:
    """Length of the longest end of ``text`` that could grow into START (held back from the content)."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-n:]):
            return n
    return 0


def _calls_in(body: str, closed: bool, memo: dict) -> list[_CallView]:
    """The calls in the text between a pair of tags: one object, or a list of objects. ``closed``: no more text
    will come (its closing tag was seen, or the output ended). ``memo``: this body's scan progress (_value_end)."""
    i = _skip_ws(body, 0)
    if i == len(body):
        if closed:
            raise Malformed("an empty tool call")
        return []
    if body[i] == "{":
        return [_object_call(body, i, closed, memo)]
    if body[i] != "[":
        raise Malformed("a tool call is a JSON object")
    calls, i = [], _skip_ws(body, i + 1)
    while i < len(body):
        if body[i] == "]":
            return calls
        if body[i] != "{":
            raise Malformed("a list of tool calls holds JSON objects")
        calls.append(_object_call(body, i, closed, memo))
        end = _value_end(body, i, memo)
        if end is None:
            return calls
        i = _skip_ws(body, end)
        if i < len(body) and body[i] == ",":
            i = _skip_ws(body, i + 1)
    if closed:
        raise Malformed("an unfinished list of tool calls")
    return calls


def _object_call(body: str, i: int, closed: bool, memo: dict) -> _CallView:
    """The name and the arguments' text of the call object at ``body[i]`` (a prefix of one unless ``closed``)."""
    fields = _fields(body, i, memo)
    if closed:
        _check_whole(body, i, memo)
    name = None
    if "name" in fields and fields["name"][1] is not None:
        start, end = fields["name"]
        name = _loads(body[start:end])
        if not isinstance(name, str):
            raise Malformed("a tool call's name is a string")
    span = fields.get("arguments") or fields.get("parameters")
    if name is None:
        return _CallView(None, "")
    if span is None:
        return _CallView(name, "{}" if closed else "")
    start, end = span
    raw = body[start:] if end is None else body[start:end]
    if raw.startswith('"'):  # arguments written as a JSON string: sent decoded, once whole
        args = _loads(raw) if end is not None else ""
        return _CallView(name, args if isinstance(args, str) else raw)
    return _CallView(name, raw)


def _check_whole(body: str, i: int, memo: dict) -> None:
    end = _value_end(body, i, memo)
    if end is None:
        raise Malformed("the tool call is not a whole JSON object")
    _loads(body[i:end])


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:  # also a bad escape inside a string the scanner took as whole
        raise Malformed(f"not JSON: {exc}") from exc


def _fields(body: str, i: int, memo: dict) -> dict[str, tuple[int, int | None]]:
    """Top-level keys of the (possibly partial) object at ``body[i]`` -> span of their value; an end of None: the
    value runs on past the text so far. Keys whose value has not started yet are left out."""
    fields: dict[str, tuple[int, int | None]] = {}
    i = _skip_ws(body, i + 1)
    while i < len(body) and body[i] != "}":
        if body[i] != '"':
            raise Malformed("an object key is a string")
        key_end = _value_end(body, i, memo)
        if key_end is None:
            return fields
        key = _loads(body[i:key_end])
        i = _skip_ws(body, key_end)
        if i == len(body):
            return fields
        if body[i] != ":":
            raise Malformed("':' after an object key")
        i = _skip_ws(body, i + 1)
        if i == len(body):
            return fields
        end = _value_end(body, i, memo)
        fields[key] = (i, end)
        if end is None:
            return fields
        i = _skip_ws(body, end)
        if i < len(body) and body[i] == ",":
            i = _skip_ws(body, i + 1)
        elif i < len(body) and body[i] != "}":
            raise Malformed("',' or '}' after an object value")
    return fields


def _value_end(s: str, i: int, memo: dict) -> int | None:
    """Index just past the JSON value starting at ``s[i]``; None when the text ends before it does.

    A string or container's scan resumes where the last call on a shorter text stopped (``memo[i]``): the text only
    grows, and rescanning a long argument object on every token would cost the square of its length."""
    ch = s[i]
    if ch in '{["':
        state = memo.get(i)
        if state is None or state[0] > len(s):  # none yet, or the text was cut (at a closing tag): from the start
            state = (i + 1, 1 if ch != '"' else 0, ch == '"', False, False)
        j, depth, in_str, escaped, done = state
        if not done:
            j, depth, in_str, escaped, done = _scan(s, j, depth, in_str, escaped)
            memo[i] = (j, depth, in_str, escaped, done)
        return j if done else None
    m = _SCALAR.match(s, i)
    if m is None and any(word.startswith(s[i:]) for word in ("-", "true", "false", "null")):
        return None  # the text ends inside a literal
    if m is None:
        raise Malformed(f"not a JSON value at {s[i:i + 10]!r}")
    if m.end() == len(s):
        return None  # "12" may go on to "123", "tru" to "true"
    return m.end()


def _scan(s: str, j: int, depth: int, in_str: bool, escaped: bool) -> tuple[int, int, bool, bool, bool]:
    """Scan on from ``s[j]`` with ``depth`` containers open and the string state: where it stopped and whether the
    value ended there (a string at depth 0 ends at its closing quote, a container when depth returns to 0)."""
    for k in range(j, len(s)):
        c = s[k]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return k + 1, 0, False, False, True
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return k + 1, 0, False, False, True
    return len(s), depth, in_str, escaped, False


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


PARSERS = {"hermes": HermesParser}
"""Parser names a deployment can choose (``tool_call_parser``) -> class."""
