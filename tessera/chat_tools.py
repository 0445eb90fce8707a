"""Tools in a chat prompt: what tessera.tokenizer.apply_chat_template does with `tools`, assistant
messages carrying `tool_calls`, and `tool` messages.

A chat template that renders tools (Qwen2.5, Llama 3.1, Hermes, ...) gets them as transformers
expects: `tools=` for the template, and each call's arguments as a dict. A template that ignores tools
(SmolLM2's: it prints each message's role and content, nothing else) would silently drop them, so
tessera falls back to the Hermes convention that Qwen2.5's own template uses, written into the
messages: the tool list and the call format in the system message, earlier calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's content, and tool results
as a user turn of `<tool_response>...</tool_response>` blocks. The `hermes` tool parser
(tessera.serve.tool_parsers) reads that call format back.
"""

from __future__ import annotations

import json
from functools import lru_cache

_PROBE_NAME = "tessera_tool_probe_7f3a"
_PROBE = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                           "parameters": {"type": "object", "properties": {}}}}

HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@lru_cache(maxsize=16)
def _renders_tools(tokenizer, template: str | None) -> bool:
    kw = {"chat_template": template} if template else {}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE], tokenize=False,
                                             add_generation_prompt=True, **kw)
    except Exception:  # a template that cannot take tools at all
        return False
    return _PROBE_NAME in text


def template_renders_tools(tokenizer, template: str | None = None) -> bool:
    """Does the chat template (the tokenizer's, or `template`) render a `tools` list?"""
    return _renders_tools(tokenizer, template)


def _arguments(call: dict) -> dict | str:
    args = (call.get("function") or {}).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _call_text(call: dict) -> str:
    fn = call.get("function") or {}
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": _arguments(call)},
                                        ensure_ascii=False) + "\n</tool_call>"


def _native(messages: list[dict]) -> list[dict]:
    """transformers' convention: a call's arguments as a dict (OpenAI sends JSON text)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**(c.get("function") or {}), "arguments": _arguments(c)}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def _hermes(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out: list[dict] = []
    tool_turn = False  # the last message in `out` is a user turn of tool results
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if tool_turn:  # consecutive results share one user turn, as Qwen2.5's template does
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            tool_turn = True
            continue
        tool_turn = False
        calls = m.get("tool_calls") or []
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + [_call_text(c) for c in calls])
        out.append(m)
    if tools:
        prompt = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_tool_messages(tokenizer, messages: list[dict], tools: list[dict] | None,
                         template: str | None = None) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) with tools and tool messages in a form the template
    shows: natively when it renders tools, else the Hermes fallback above."""
    has_tool_messages = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not tools and not has_tool_messages:
        return messages, {}
    if template_renders_tools(tokenizer, template):
        return _native(messages), ({"tools": tools} if tools else {})
    return _hermes(messages, tools), {}
