"""logit_bias, allowed_token_ids, bad_words and best_of through the OpenAI API (serving.py's request
translation), on the keyed_server fixture (tests/conftest.py)."""

from __future__ import annotations

import httpx
from conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"


def completion(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_logit_bias_on_completions_and_chat(keyed_server):
    url, llm = keyed_server
    tok = llm.get_tokenizer()
    forced = completion(url, logit_bias={"42": 100}, ignore_eos=True)["choices"][0]["text"]
    assert forced == tok.decode([42] * 6)
    messages = [{"role": "user", "content": "Name a colour."}]
    ref = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0,
                                                         "logprobs": True}, headers=AUTH, timeout=120).json()
    first = ref["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = tok.convert_tokens_to_ids(tok.tokenize(first))[0] if first else None
    assert first_id is not None
    banned = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0,
                                                            "logprobs": True, "logit_bias": {str(first_id): -100}},
                        headers=AUTH, timeout=120).json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != first


def test_allowed_token_ids_and_bad_words(keyed_server):
    url, llm = keyed_server
    tok = llm.get_tokenizer()
    yes = tok.encode(" yes", add_special_tokens=False)
    assert len(yes) == 1
    assert completion(url, allowed_token_ids=yes, ignore_eos=True, max_tokens=3)["choices"][0]["text"] == " yes" * 3
    ref = completion(url, max_tokens=12)["choices"][0]["text"]
    assert "Paris" in ref
    out = completion(url, max_tokens=12, bad_words=["Paris"])["choices"][0]["text"]
    assert "Paris" not in out


def test_best_of_returns_the_n_most_likely_choices(keyed_server):
    url, _ = keyed_server
    kw = dict(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=0)
    every = completion(url, n=4, **kw)["choices"]
    best = completion(url, n=2, best_of=4, **kw)["choices"]

    def score(choice):
        return sum(choice["logprobs"]["token_logprobs"])

    ranked = sorted(every, key=score, reverse=True)
    assert len({c["text"] for c in every}) > 1
    assert [c["index"] for c in best] == [0, 1]
    assert [c["text"] for c in best] == [c["text"] for c in ranked[:2]]
    assert completion(url, n=1, best_of=1, stream=False)["choices"][0]["index"] == 0
