"""The Hermes tool-call parser on crafted model output: content and calls found, whole and fed in pieces (every
split gives what the whole text gives), names before arguments, held-back tag prefixes, malformed calls as text."""

from __future__ import annotations

import json
import random

import pytest

from crescent.services.gateway.tool_parsers import CallDelta, HermesParser, merge

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"x": "}]\\"{"}], "ok": true}}'
ARGS = json.dumps(json.loads(CALL)["arguments"])


def _calls(calls: list[CallDelta]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# text -> (content, [(name, arguments as parsed JSON)])
CASES = {
    "plain": ("The weather is fine.", ("The weather is fine.", [])),
    "call": (f"<tool_call>\n{CALL}\n</tool_call>", ("", [("get_weather", json.loads(ARGS))])),
    "text then call": (f"Let me look.\n<tool_call>{CALL}</tool_call>", ("Let me look.\n",
                                                                       [("get_weather", json.loads(ARGS))])),
    "two tags": ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
                 '{"q": null}}</tool_call>', ("", [("a", {}), ("b", {"q": None})])),
    "a list in one tag": ('<tool_call>[{"name": "a", "arguments": {"n": -1.5e3}}, {"name": "b", "arguments": {}}]'
                          "</tool_call>", ("", [("a", {"n": -1500.0}), ("b", {})])),
    "no closing tag": (f"<tool_call>{CALL}", ("", [("get_weather", json.loads(ARGS))])),
    "name after arguments": ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', ("", [("f", {"x": 1})])),
    "no arguments": ('<tool_call>{"name": "f"}</tool_call>', ("", [("f", {})])),
    "parameters key": ('<tool_call>{"name": "f", "parameters": {"x": 2}}</tool_call>', ("", [("f", {"x": 2})])),
    "text after a call is dropped": (f"<tool_call>{CALL}</tool_call> Done!", ("", [("get_weather",
                                                                                     json.loads(ARGS))])),
    "not json": ("<tool_call>I would call it</tool_call>", ("<tool_call>I would call it</tool_call>", [])),
    "a tag's prefix in text": ("a <tool_ b <tool_call", ("a <tool_ b <tool_call", [])),
    "a lone tag": ("<tool_call>", ("<tool_call>", [])),
}


@pytest.mark.parametrize("text, expected", CASES.values(), ids=CASES.keys())
def test_whole_output(text, expected):
    content, calls = HermesParser().parse_all(text)
    assert (content, _calls(calls)) == expected


@pytest.mark.parametrize("text, expected", CASES.values(), ids=CASES.keys())
def test_any_split_gives_the_whole_outputs_result(text, expected):
    rng = random.Random(len(text))
    for trial in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, trial % 7 + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        if trial == 0:
            pieces = list(text)  # one character at a time, as a char-level tokenizer streams
        parser = HermesParser()
        parts = [parser.feed(p) for p in pieces] + [parser.finish()]
        merged = merge(parts)
        assert (merged.content, _calls(merged.calls)) == expected, pieces
        seen: set[int] = set()
        for c in (c for p in parts for c in p.calls):  # a call's first delta names it; later ones add arguments
            assert (c.name is not None) == (c.index not in seen)
            seen.add(c.index)


def test_streamed_name_comes_first_then_argument_fragments():
    parser = HermesParser()
    text = f"Sure.<tool_call>\n{CALL}\n</tool_call>"
    parts = [parser.feed(ch) for ch in text] + [parser.finish()]
    content = "".join(p.content for p in parts)
    calls = [c for p in parts for c in p.calls]
    assert content == "Sure."
    assert calls[0].name == "get_weather" and calls[0].index == 0
    assert all(c.name is None and c.index == 0 for c in calls[1:])
    assert len(calls) > 10  # arguments stream as they come, not in one piece at the end
    assert json.loads("".join(c.arguments for c in calls)) == json.loads(ARGS)
    assert parser.called


def test_content_that_may_open_a_tag_waits_until_it_does_not():
    parser = HermesParser()
    assert parser.feed("Hi <tool").content == "Hi "
    assert parser.feed("s are").content == "<tools are"
    assert parser.feed(" <").content == " "
    assert parser.finish().content == "<"
    assert not parser.called


def test_a_call_cut_short_keeps_its_name_and_the_arguments_so_far():
    """max_tokens ended the output inside the arguments: what was sent stays (finish_reason says "length")."""
    content, calls = HermesParser().parse_all('<tool_call>{"name": "f", "arguments": {"city": "Par')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"city": "Par')]


def test_arguments_that_turn_out_invalid_are_content_whole_but_stay_a_call_streamed():
    """Streamed, the name was sent before the arguments went wrong, and a sent call cannot be taken back (vLLM's
    parser does the same); whole, the text is content."""
    text = '<tool_call>{"name": "f", "arguments": {"x": }}</tool_call>'
    assert HermesParser().parse_all(text) == (text, [])
    parser = HermesParser()
    streamed = merge([parser.feed(ch) for ch in text] + [parser.finish()])
    assert [(c.name, c.arguments) for c in streamed.calls] == [("f", '{"x": }')] and streamed.content == ""


def test_text_after_a_sent_call_that_breaks_is_dropped():
    content, calls = HermesParser().parse_all('<tool_call>{"name": "f", "arguments": {}}</tool_call>'
                                              "<tool_call>oops</tool_call>")
    assert content == "" and _calls(calls) == [("f", {})]


def test_arguments_written_as_a_json_string_are_sent_decoded():
    _, calls = HermesParser().parse_all('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]


def test_max_calls_keeps_the_first():
    text = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>'
    assert [c.name for c in HermesParser(max_calls=1).parse_all(text)[1]] == ["a"]
    assert [c.name for c in HermesParser().parse_all(text)[1]] == ["a", "b"]


@pytest.mark.parametrize("text", ['<tool_call>{"name": 5, "arguments": {}}</tool_call>',
                                  '<tool_call>{name: "f"}</tool_call>', "<tool_call>[1, 2]</tool_call>",
                                  '<tool_call>{"name": "f", "arguments": {}} x'], ids=str)
def test_malformed_calls_are_content(text):
    content, calls = HermesParser().parse_all(text)
    if calls:  # the last: a whole call, then text that is not a closing tag
        assert _calls(calls) == [("f", {})] and content == ""
    else:
        assert content == text


def test_random_text_never_breaks_the_parser():
    """Whatever a model writes (tags, JSON pieces, bad escapes), fed in any pieces: content and calls, no error."""
    rng = random.Random(17)
    atoms = ["<tool_call>", "</tool_call>", "<tool_", "{", "}", "[", "]", '"name"', '"arguments"', ":", ",", '"f"',
             '"\\q"', '"\\', "1", "-", "tru", "null", " ", "\n", "x", '"', "é"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 30)))
        parser = HermesParser()
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        merged = merge([parser.feed(p) for p in pieces] + [parser.finish()])
        assert all(isinstance(c.arguments, str) and c.name is not None for c in merged.calls)
        content, calls = HermesParser().parse_all(text)
        assert content == text or calls  # no call found: all of it is content
