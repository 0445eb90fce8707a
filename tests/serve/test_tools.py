"""Tool calling on /v1/chat/completions with the official `openai` client, on the default model
(SmolLM2, whose chat template ignores tools: tessera's Hermes fallback renders them): a round trip
call -> tool message -> answer, tool_choice required / named / auto (with --tool-call-parser hermes),
streamed tool calls, and bad tool input as 400s that name it."""

from __future__ import annotations

import json

import httpx
import jsonschema  # dev dependency: the suite fails loudly without it
import openai
import pytest
from conftest import API_KEY, SERVED_NAMES

from tessera.serve.errors import APIError
from tessera.serve.tools import plan_tools

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"]},
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# A model-independent way to make the model write a Hermes call, so that the parser is what is tested
CALL_REGEX = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}", '
              r'"unit": "celsius"\}\}\n</tool_call>')


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def params_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), params_of(call.function.name))


def test_round_trip_named_call_then_tool_result_then_answer(tool_server):
    url, _ = tool_server
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls, {"get_weather"})
    call = choice.message.tool_calls[0]
    messages = ASK + [
        choice.message.model_dump(exclude_none=True),  # the assistant turn with its tool_calls, as clients send it
        {"role": "tool", "tool_call_id": call.id, "content": "It is 18 degrees celsius and sunny."},
    ]
    answer = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=40)
    a = answer.choices[0]
    assert a.message.content and not a.message.tool_calls and a.finish_reason in ("stop", "length")
    # The tool result really is in the prompt: the answer's prompt is longer than the call's by at least it
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens - 200  # tools are rendered in both
    plain = c.chat.completions.create(model=MODEL, messages=messages[:1], temperature=0, max_tokens=1)
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def test_required_gives_calls_to_known_tools(tool_server):
    url, _ = tool_server
    c = client(url)
    # A 135M model given room for many calls keeps adding more: parallel_tool_calls=false makes it one
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                      temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        assert len(r.choices[0].message.tool_calls) == 1
        check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})


def test_auto_with_hermes_parser(tool_server):
    url, _ = tool_server
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0,
                                  max_tokens=60, extra_body={"guided_regex": CALL_REGEX})
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    check_calls(m.tool_calls, {"get_weather"})
    # Without a call in the output, auto answers in text
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=20,
                                  extra_body={"guided_regex": "It is (sunny|rainy)\\."})
    assert r.choices[0].message.content in ("It is sunny.", "It is rainy.") and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def stream_calls(c, **kw):
    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("kw", [
    dict(tool_choice="auto", extra_body={"guided_regex": r"Let me check\. " + CALL_REGEX}),
    dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    dict(tool_choice="required", parallel_tool_calls=False),
], ids=["auto", "named", "required"])
def test_streamed_tool_calls_equal_non_streamed(tool_server, kw):
    url, _ = tool_server
    c = client(url)
    whole = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120, **kw)
    content, calls, finish = stream_calls(c, temperature=0, max_tokens=120, **kw)
    m = whole.choices[0].message
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert content == (m.content or "")
    assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == [
        (tc.function.name, tc.function.arguments) for tc in m.tool_calls]
    assert all(v["id"] for v in calls.values())
    if "extra_body" in kw:
        assert content == "Let me check. "


@pytest.mark.parametrize("extra, field", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_input_is_a_400_naming_it(tool_server, extra, field):
    url, _ = tool_server
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4, **extra},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()
    ok = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_auto_without_a_parser_is_a_400_as_in_vllm(keyed_server):
    url, _ = keyed_server  # started without --tool-call-parser
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": SERVED_NAMES[0], "messages": ASK, "max_tokens": 4, "tools": TOOLS}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                   json={**body, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 100})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"]


@pytest.mark.parametrize("text", ['{"a": 1}', "[1, 2]", '[{"name": "get_time"}]', '[{"name": "get_t'])
def test_required_output_that_is_not_calls_stays_content(text):
    """Only an unfinished output can break the constraint's shape: it is returned as text, not a 500."""
    plan = plan_tools(TOOLS, "required", None)
    parsed = plan.parse(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_named_and_required_constraints_follow_the_tools():
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None).guided()
    assert named.json == TIME["function"]["parameters"]
    required = plan_tools(TOOLS, "required", None, parallel_tool_calls=False).guided().json
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [i["properties"]["name"]["enum"] for i in required["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert plan_tools(TOOLS, "none", None).tools is None  # "none" renders no tools
    with pytest.raises(APIError, match="--tool-call-parser"):
        plan_tools(TOOLS, None, None)
