"""Tool-call parsers: from a model's output text to OpenAI `tool_calls`, whole or streamed.

A parser is chosen by `tessera serve --tool-call-parser NAME` (vLLM's flag). `hermes` reads the
Hermes/Qwen form that tessera's fallback tool prompt (tessera.tokenizer) also asks for:

    some optional text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

as vLLM's Hermes parser does: each block is one call, and a last block the output ends inside (no
closing tag) still counts when its JSON is whole. Unlike vLLM, which keeps only the text before the
first block, all text outside the calls is the content, and a block that is not a valid call stays
in the content as written: nothing the model wrote is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tessera.serve.protocol import FunctionCall, ToolCall


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def make_tool_call(name: str, arguments) -> ToolCall:
    """A ToolCall; `arguments` as OpenAI sends them, JSON text (dicts are serialised)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=name, arguments=args))


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"

    @classmethod
    def parse_call(cls, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(args, dict | str):
            return None
        return make_tool_call(obj["name"], args)

    def parse(self, text: str) -> ParsedOutput:
        """The whole output, read as the stream reads it (so streamed and whole responses agree): text
        outside well-formed blocks is the content, None when only whitespace is left around calls."""
        stream = self.streamer()
        first, rest = stream.feed(text), stream.finish()
        content = first.content + rest.content
        tool_calls = first.tool_calls + rest.tool_calls
        if tool_calls and not content.strip():
            content = None
        return ParsedOutput(content, tool_calls)

    def streamer(self) -> HermesStream:
        return HermesStream(self)


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class HermesStream:
    """One choice's stream: text outside <tool_call> blocks goes out as content at once (less a tail
    that could be the start of the tag); a block is held until it closes, then goes out as one
    tool-call delta (vLLM's delta shape, the whole arguments string in one piece)."""

    parser: HermesToolParser
    buffer: str = ""  # text not yet sent
    inside: bool = False
    num_calls: int = 0

    def feed(self, text: str) -> StreamDelta:
        self.buffer += text
        out = StreamDelta()
        p = self.parser
        while True:
            if not self.inside:
                at = self.buffer.find(p.start)
                if at < 0:
                    keep = _partial_suffix(self.buffer, p.start)
                    out.content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                out.content += self.buffer[:at]
                self.buffer = self.buffer[at + len(p.start):]
                self.inside = True
            end = self.buffer.find(p.end)
            if end < 0:
                return out
            body, self.buffer = self.buffer[:end], self.buffer[end + len(p.end):]
            self.inside = False
            call = p.parse_call(body.strip())
            if call is None:  # not a call: it was text after all
                out.content += p.start + body + p.end
            else:
                out.tool_calls.append(call)
                self.num_calls += 1

    def finish(self) -> StreamDelta:
        """What is left at the end of the output: an unclosed last block counts when its JSON is whole."""
        out = StreamDelta()
        if self.inside:
            call = self.parser.parse_call(self.buffer.strip())
            if call is not None:
                out.tool_calls.append(call)
                self.num_calls += 1
            else:
                out.content = self.parser.start + self.buffer
        else:
            out.content = self.buffer
        self.buffer, self.inside = "", False
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


TOOL_PARSERS = {"hermes": HermesToolParser}


def get_tool_parser(name: str) -> HermesToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown --tool-call-parser {name!r}; choose from {', '.join(TOOL_PARSERS)}") from None
