"""The bad-input tour: malformed or unsupported requests on every route of a server started with
--api-key and two --served-model-name (the keyed_server fixture, tests/conftest.py). Each gets a 4xx in
OpenAI's error shape whose message names what is wrong; nothing is lost, and afterwards the server
still answers a normal request exactly as before the tour."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
CMPL, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
MSGS = [{"role": "user", "content": "Hi"}]
REFERENCE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}

BAD = [
    # the body itself
    (CMPL, "{not json", 400, "Invalid JSON"),
    (CHAT, "{\"messages\": ", 400, "Invalid JSON"),
    (TOK, "[1, 2]", 400, "valid dictionary"),
    (CMPL, "[1, 2]", 400, "valid dictionary"),
    # missing, unknown and wrongly typed fields
    (CMPL, {"max_tokens": 2}, 400, "prompt"),
    (CHAT, {"max_tokens": 2}, 400, "messages"),
    (CMPL, {"prompt": "hi", "guided_jsn": {"type": "object"}}, 400, "unknown field 'guided_jsn'"),
    (CHAT, {"messages": MSGS, "guided_jsn": {"type": "object"}}, 400, "unknown field 'guided_jsn'"),
    (CHAT, {"messages": MSGS, "temprature": 0.5}, 400, "unknown field 'temprature'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "bogus": 1}]}, 400, "unknown field 'messages.0.bogus'"),
    (CMPL, {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400,
     "unknown field 'stream_options.x'"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (CMPL, {"prompt": "hi", "stream": "yes please"}, 400, "stream"),
    (CMPL, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    (CMPL, {"prompt": "hi", "seed": "abc"}, 400, "seed"),
    (CMPL, {"prompt": {"text": "hi"}}, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    # values out of range
    (CMPL, {"prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
    (CMPL, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (CMPL, {"prompt": "hi", "top_k": -7}, 400, "top_k"),
    (CMPL, {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CMPL, {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (CMPL, {"prompt": "hi", "n": 0}, 400, "n must be"),
    (CMPL, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (CMPL, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (CMPL, {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (CMPL, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": MSGS, "top_logprobs": 3}, 400, "top_logprobs"),
    # logit_bias, allowed_token_ids, bad_words, best_of
    (CMPL, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias key 'abc'"),
    (CHAT, {"messages": MSGS, "logit_bias": {"5": 500}}, 400, "logit_bias value 500"),
    (CMPL, {"prompt": "hi", "logit_bias": {"5": "up"}}, 400, "logit_bias"),
    (CMPL, {"prompt": "hi", "logit_bias": [5]}, 400, "logit_bias"),
    (CHAT, {"messages": MSGS, "logit_bias": {"1000000": 1}}, 400, "logit_bias token ids [1000000]"),
    (CMPL, {"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    (CMPL, {"prompt": "hi", "allowed_token_ids": [1, 10**7]}, 400, "allowed_token_ids token ids [10000000]"),
    (CHAT, {"messages": MSGS, "bad_words": [""]}, 400, "bad_words"),
    (CMPL, {"prompt": "hi", "bad_words": "word"}, 400, "bad_words"),
    (CMPL, {"prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of must be an integer >= n (3)"),
    (CMPL, {"prompt": "hi", "n": 1, "best_of": 3, "stream": True}, 400, "best_of > n cannot be streamed"),
    (CMPL, {"prompt": "hi", "best_of": 10**6}, 400, "best_of must be at most"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    # prompts and token ids
    (CMPL, {"prompt": ""}, 400, "empty"),
    (CMPL, {"prompt": [1, 2, 10**9]}, 400, "outside the vocabulary"),
    (CMPL, {"prompt": [5] * 3000}, 400, "maximum context length is 1024 tokens"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CMPL, '{"prompt": "a\\ud800b"}', 400, "lone surrogate"),
    (TOK, '{"prompt": "a\\ud800b"}', 400, "lone surrogate"),
    (DETOK, {"tokens": [10**6]}, 400, "outside the vocabulary"),
    (DETOK, {"tokens": ["a"]}, 400, "tokens"),
    (TOK, {"prompt": "hi", "bogus": True}, 400, "unknown field 'bogus'"),
    # the model name and the key
    (CMPL, {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    (CHAT, {"messages": MSGS, "model": "SmolLM2"}, 404, "does not exist"),
    (TOK, {"prompt": "hi", "model": "nope"}, 404, "does not exist"),
    ("/v1/nothing-here", {}, 404, "Not Found"),
]
NO_KEY = [CMPL, CHAT, TOK, DETOK, "/v1/models"]


def good_request(url: str) -> dict:
    r = httpx.post(url + CMPL, json=REFERENCE, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def before(keyed_server):
    """The reference answer, taken before the tour."""
    return good_request(keyed_server[0])


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_request_is_a_4xx_that_names_the_problem(keyed_server, before, path, body, status, needle):
    url, _ = keyed_server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + path, content=content, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err


@pytest.mark.parametrize("path", NO_KEY)
def test_missing_key_is_a_401(keyed_server, before, path):
    url, _ = keyed_server
    r = httpx.request("GET" if path == "/v1/models" else "POST", url + path, content="{}", timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_harmless_openai_fields_are_accepted_with_a_warning(keyed_server, before):
    url, _ = keyed_server
    body = {**REFERENCE, "user": "u1", "store": False, "metadata": {"run": "7"}, "service_tier": "auto",
            "unknown_but_null": None}
    r = httpx.post(url + CMPL, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == before["text"]
    assert "metadata, service_tier, store" in r.headers["warning"]
    r = httpx.post(url + CHAT, json={"messages": MSGS, "max_tokens": 1, "parallel_tool_calls": True,
                                     "prompt_cache_key": "k"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_after_the_tour_the_server_answers_as_before(keyed_server, before):
    url, _ = keyed_server
    assert httpx.get(url + "/health").status_code == 200
    after = good_request(url)
    assert after["text"] == before["text"] and after["finish_reason"] == before["finish_reason"]
    metrics = httpx.get(url + "/metrics").text
    assert "tessera:num_requests_running" in metrics
