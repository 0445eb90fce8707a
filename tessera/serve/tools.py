"""Tool calling on /v1/chat/completions: checking `tools` and `tool_choice`, the constraint that
enforces `required` or a named function, and turning a choice's output into `tool_calls`.

As vLLM:
- `tool_choice` defaults to "auto" when tools are given. "auto" needs `--tool-call-parser` (vLLM asks
  for `--enable-auto-tool-choice --tool-call-parser`): without one the request is a 400, since the
  output could not be read back as calls.
- "none" renders no tools (the model answers in text).
- A named function constrains the output to that function's `parameters` schema; the whole output
  is its arguments. "required" constrains it to a JSON array of one or more
  {"name": <one of the tools>, "parameters": {...}} objects. Neither needs a parser.
- The tool calls come back with finish_reason "tool_calls" (also for required/named, where OpenAI
  says "stop"; vLLM does either depending on the version).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tessera.errors import InvalidRequestError
from tessera.guided_params import GuidedDecodingParams
from tessera.serve.errors import APIError
from tessera.serve.protocol import ChatResponseMessage
from tessera.serve.tool_parsers import ParsedOutput, StreamDelta, get_tool_parser, make_tool_call

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names
_EMPTY_PARAMS = {"type": "object", "properties": {}}


def check_tools(tools) -> list[dict]:
    """The tools as OpenAI function tools; 400 naming the first malformed one."""
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "tools must be a non-empty list of function tools", param="tools")
    seen = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise APIError(400, f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                f"got {name!r}", param=f"{where}.function.name")
        if name in seen:
            raise APIError(400, f"{where}: function {name!r} is defined twice", param=f"{where}.function.name")
        seen.add(name)
        params = fn.get("parameters", _EMPTY_PARAMS)
        if not isinstance(params, dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON schema object",
                           param=f"{where}.function.parameters")
        if "description" in fn and not isinstance(fn["description"], str | None):
            raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
    return tools


@dataclass
class ToolPlan:
    """What a chat request's tools mean for this request."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict] | None  # rendered into the prompt (None: no tools shown)
    named: str | None = None
    parser: object = None  # a tool parser, for "auto"
    parallel: bool = True  # parallel_tool_calls: more than one call allowed

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    def guided(self) -> GuidedDecodingParams | None:
        """The constraint that enforces required / named (None for auto and none)."""
        if self.mode == "named":
            fn = next(t["function"] for t in self.tools if t["function"]["name"] == self.named)
            return GuidedDecodingParams(json=fn.get("parameters", _EMPTY_PARAMS))
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                       "parameters": t["function"].get("parameters", _EMPTY_PARAMS)},
                      "required": ["name", "parameters"]} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return GuidedDecodingParams(json=schema)
        return None

    def compiled_guided(self, grammars) -> GuidedDecodingParams | None:
        """guided(), compiled by `grammars` (cached): a tool schema xgrammar cannot take is a 400."""
        params = self.guided()
        if params is not None:
            try:
                grammars.compile(params)
            except InvalidRequestError as e:
                raise APIError(400, f"tools: a function's parameters schema: {e}", param="tools") from e
        return params

    def parse(self, text: str) -> ParsedOutput:
        """A finished choice's text as content and tool calls. Output that is not the calls the
        constraint asked for (cut off by max_tokens) stays content."""
        if self.mode == "auto":
            return self.parser.parse(text)
        if self.mode in ("named", "required"):
            try:
                obj = json.loads(text)
            except ValueError:
                return ParsedOutput(text, [])
            if self.mode == "named":
                return ParsedOutput(None, [make_tool_call(self.named, obj)])
            if not isinstance(obj, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and "parameters" in c for c in obj
            ):  # only an output the constraint did not finish can be anything else
                return ParsedOutput(text, [])
            return ParsedOutput(None, [make_tool_call(c["name"], c["parameters"]) for c in obj])
        return ParsedOutput(text, [])

    def streamer(self) -> ToolStream | None:
        return ToolStream(self) if self.calls_tools else None


@dataclass
class ToolStream:
    """One choice's streamed tool calls. With a parser, content flows until a call starts; with
    required/named the whole output is the calls, sent when it is complete."""

    plan: ToolPlan
    text: str = ""
    inner: object = None
    num_sent: int = 0  # tool calls sent so far (the next one's index)

    def __post_init__(self) -> None:
        if self.plan.mode == "auto":
            self.inner = self.plan.parser.streamer()

    def feed(self, delta: str) -> StreamDelta:
        if self.inner is not None:
            return self.inner.feed(delta)
        self.text += delta
        return StreamDelta()

    def finish(self) -> StreamDelta:
        if self.inner is not None:
            return self.inner.finish()
        parsed = self.plan.parse(self.text)
        return StreamDelta(parsed.content or "", parsed.tool_calls)


def plan_tools(tools, tool_choice, parser_name: str | None, parallel_tool_calls: bool | None = None) -> ToolPlan:
    """Checks `tools` and `tool_choice` (400 naming the field) and says what they mean."""
    if tools is None:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise APIError(400, f"tool_choice {json.dumps(tool_choice)} needs `tools`", param="tool_choice")
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                                f"got {tool_choice!r}", param="tool_choice")
        return ToolPlan("none", None)
    tools = check_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", None)
    if choice == "auto":
        if parser_name is None:
            raise APIError(400, '"auto" tool choice requires the server to be started with --tool-call-parser '
                                '(vLLM: --enable-auto-tool-choice --tool-call-parser); use tool_choice "required", '
                                'a named function, or "none"', param="tool_choice")
        return ToolPlan("auto", tools, parser=get_tool_parser(parser_name))
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel_tool_calls is not False)
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'a named tool_choice must be {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return ToolPlan("named", tools, named=name)
    raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                   param="tool_choice")


def _finish_reason(finish: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish == "stop" else finish


def tool_message(plan: ToolPlan, output) -> tuple[ChatResponseMessage, str | None]:
    """A finished choice (a CompletionOutput) as the assistant message and its finish_reason."""
    if not plan.calls_tools:
        return ChatResponseMessage(content=output.text), output.finish_reason
    parsed = plan.parse(output.text)
    return (ChatResponseMessage(content=parsed.content, tool_calls=parsed.tool_calls),
            _finish_reason(output.finish_reason, bool(parsed.tool_calls)))


def tool_stream_delta(ts: ToolStream, text: str, finish: str | None) -> tuple[dict | None, str | None]:
    """The chunk delta for `text` newly generated on one choice (vLLM's shape: each call once, whole,
    as {"index", "id", "type", "function": {"name", "arguments"}}), and its finish_reason; (None, None)
    while everything is held back."""
    d = ts.feed(text)
    if finish is not None:
        rest = ts.finish()
        d = StreamDelta(d.content + rest.content, d.tool_calls + rest.tool_calls)
    delta: dict = {}
    if d.content:
        delta["content"] = d.content
    if d.tool_calls:
        delta["tool_calls"] = [{"index": ts.num_sent + j, **c.model_dump()} for j, c in enumerate(d.tool_calls)]
        ts.num_sent += len(d.tool_calls)
    if not delta and finish is None:
        return None, None
    return delta, _finish_reason(finish, ts.num_sent > 0)
