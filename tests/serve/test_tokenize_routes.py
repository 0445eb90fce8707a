"""vLLM's /tokenize and /detokenize (tessera/serve/tokenize_routes.py), on the keyed_server fixture
(tests/conftest.py: API key, two served names, a --chat-template of its own)."""

from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY, SERVED_NAMES

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60)


def test_tokenize_a_prompt_and_detokenize_it_back(keyed_server):
    url, llm = keyed_server
    tok = llm.get_tokenizer()
    text = "The capital of France is Paris. Ünïcödé ✓"
    r = post(url, "/tokenize", {"model": SERVED_NAMES[1], "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text, add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    plain = post(url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode(text, add_special_tokens=False) and "token_strs" not in plain
    r = post(url, "/detokenize", {"model": SERVED_NAMES[0], "tokens": plain["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_tokenize_messages_renders_the_servers_chat_template_as_chat_does(keyed_server):
    url, llm = keyed_server
    tok = llm.get_tokenizer()
    body = post(url, "/tokenize", {"messages": CHAT}).json()
    rendered = "".join(f"<|im_start|>{m['role']}: {m['content']}<|im_end|>\n" for m in CHAT) + "<|im_start|>assistant: "
    assert body["tokens"] == tok.encode(rendered, add_special_tokens=False)  # --chat-template, not the model's
    no_prompt = post(url, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == tok.encode(rendered.removesuffix("<|im_start|>assistant: "), add_special_tokens=False)
    chat = post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    assert chat["model"] == SERVED_NAMES[0]  # responses carry the first served name


@pytest.mark.parametrize("path,body,needle", [
    ("/detokenize", {"tokens": [1, 10**6]}, "token ids [1000000] are outside the vocabulary"),
    ("/detokenize", {"tokens": [-1]}, "token ids [-1] are outside the vocabulary"),
    ("/detokenize", {"tokens": "hello"}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokenz": True}, "unknown field 'add_special_tokenz'"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "hi", "model": "nope"}, "does not exist"),
])
def test_bad_tokenize_requests_are_4xx_naming_the_field(keyed_server, path, body, needle):
    url, _ = keyed_server
    r = post(url, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.json()["error"]["message"]
