"""Tools in chat prompts: SmolLM2's template ignores tools, so tessera's Hermes fallback writes them
into the messages; a template that renders tools gets them natively, call arguments as dicts."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tessera.chat_tools import template_renders_tools
from tessera.models.default_model import default_model_dir
from tessera.tokenizer import apply_chat_template

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "18C"},
    {"role": "tool", "tool_call_id": "b", "content": "21C"},
]
# A template that renders tools and calls (the shape of Qwen2.5's, much reduced)
NATIVE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
          "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% for c in m.tool_calls or [] %}"
          "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}\n{% endfor %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(default_model_dir(progress=False)))


def test_smollm2_template_ignores_tools_so_the_fallback_renders_them(tok):
    assert not template_renders_tools(tok)
    text = tok.decode(apply_chat_template(tok, CONVERSATION, True, tools=TOOLS))
    assert text.startswith("<|im_start|>system\n# Tools")  # the fallback system message
    assert json.dumps(TOOLS[0]) in text and "<tool_call></tool_call>" in text
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>') in text
    # both results in one user turn, in order
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n21C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_messages_without_tools_still_render(tok):
    text = tok.decode(apply_chat_template(tok, CONVERSATION, True))
    assert "# Tools" not in text and "<tool_response>\n18C" in text and '"city": "Rome"' in text


def test_a_template_that_renders_tools_gets_them_natively(tok):
    assert template_renders_tools(tok, NATIVE)
    text = tok.decode(apply_chat_template(tok, CONVERSATION, False, tools=TOOLS, chat_template=NATIVE))
    assert text.startswith("TOOLS:get_weather;")
    assert "CALL get_weather Paris" in text and "CALL get_weather Rome" in text  # arguments became dicts
    assert "[tool]18C" in text
