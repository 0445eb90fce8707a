"""The Hermes tool parser, whole and streamed: streamed pieces add up to the whole parse, whatever
the chunking, and nothing the model wrote is lost."""

from __future__ import annotations

import json

import pytest

from tessera.serve.tool_parsers import HermesToolParser, get_tool_parser

CALL1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'


def calls(parsed):
    return [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("text, content, want", [
    ("Just text.", "Just text.", []),
    (CALL1, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look. " + CALL1 + "\n" + CALL2, "Let me look. \n",
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}', None, [("f", {})]),  # ended without the closing tag
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),  # kept as text
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("x <tool_call>{bad}</tool_call> y " + CALL1 + " z", "x <tool_call>{bad}</tool_call> y  z",
     [("get_weather", {"city": "Paris"})]),  # nothing dropped around a good call
    ("a < b, <tool_ca", "a < b, <tool_ca", []),  # a partial tag at the end is text
])
def test_parse(text, content, want):
    parsed = HermesToolParser().parse(text)
    assert parsed.content == content
    assert calls(parsed) == want
    assert all(c.id and c.type == "function" for c in parsed.tool_calls)


@pytest.mark.parametrize("text", [
    "Let me look. " + CALL1 + "\n" + CALL2,
    "a < b and <tool_ is not a tag <tool_call",
    CALL1 + " trailing words",
    "<tool_call>{broken</tool_call> then " + CALL1,
])
@pytest.mark.parametrize("step", [1, 2, 5, 11, 1000])
def test_stream_adds_up_to_the_whole_parse(text, step):
    parser = HermesToolParser()
    stream = parser.streamer()
    content, got = "", []
    for i in range(0, len(text), step):
        d = stream.feed(text[i:i + step])
        content += d.content
        got += d.tool_calls
    d = stream.finish()
    content += d.content
    got += d.tool_calls
    whole = parser.parse(text)
    assert [(c.function.name, c.function.arguments) for c in got] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls]
    assert content == (whole.content or "") or (whole.content is None and not content.strip())


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("mistral")
