"""Structured output through the server with the official `openai` client: OpenAI's response_format,
vLLM's guided_* fields and structured_outputs, on both endpoints; bad constraints are 400s naming the
field, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import httpx
import jsonschema  # dev dependency: the suite fails loudly without it
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "is_capital": {"type": "boolean"},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "is_capital"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe the city of Paris as JSON."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def test_json_schema_sampled_20_times_validates(tool_server):
    url, _ = tool_server
    c = client(url)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}

    def one(seed: int):
        r = c.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=1.0,
                                      max_tokens=256, seed=seed)
        return r.choices[0]

    with cf.ThreadPoolExecutor(20) as pool:
        choices = list(pool.map(one, range(20)))
    texts = set()
    for ch in choices:
        assert ch.finish_reason == "stop", ch.message.content
        jsonschema.validate(json.loads(ch.message.content), CITY)
        texts.add(ch.message.content)
    assert len(texts) > 1  # really sampled


def test_guided_fields_on_completions(tool_server):
    url, _ = tool_server
    c = client(url)
    base = dict(model=MODEL, prompt="The best fruit is", max_tokens=40, temperature=1.0, seed=3)
    r = c.completions.create(**base, extra_body={"guided_choice": ["apple", "banana", "cherry pie"]})
    assert r.choices[0].text in ("apple", "banana", "cherry pie") and r.choices[0].finish_reason == "stop"
    r = c.completions.create(**base, extra_body={"guided_regex": r"[A-Z][a-z]{2,6}, [0-9]{4}"})
    assert re.fullmatch(r"[A-Z][a-z]{2,6}, [0-9]{4}", r.choices[0].text), r.choices[0].text
    r = c.completions.create(**base, extra_body={"guided_grammar": 'root ::= "yes" | "no" | "(" [0-9] ")"'})
    assert re.fullmatch(r"yes|no|\([0-9]\)", r.choices[0].text), r.choices[0].text
    r = c.completions.create(**{**base, "max_tokens": 200}, extra_body={"guided_json": CITY})
    jsonschema.validate(json.loads(r.choices[0].text), CITY)
    r = c.completions.create(**base, extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].text in ("up", "down")


def test_structured_outputs_and_json_object_on_chat(tool_server):
    url, _ = tool_server
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r"(Paris|Lyon) is [a-z]+\."}})
    assert re.fullmatch(r"(Paris|Lyon) is [a-z]+\.", r.choices[0].message.content)
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, temperature=0,
                                  response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                  response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_equals_non_streamed_and_n_choices(tool_server):
    url, _ = tool_server
    c = client(url)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    args = dict(model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=256)
    whole = c.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**args, stream=True)
                       if ch.choices)
    assert streamed == whole
    r = c.chat.completions.create(**{**args, "temperature": 1.0, "n": 3, "seed": 5})
    assert len(r.choices) == 3
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), CITY)


@pytest.mark.parametrize("path, extra, field", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                              "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}},
     "response_format"),
    ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/completions", {"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
    ("/v1/chat/completions", {"guided_choice": "yes"}, "guided_choice"),
])
def test_bad_constraints_are_400s_naming_the_field(tool_server, path, extra, field):
    url, _ = tool_server
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "Hi"})
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field or field in err["message"], err
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
