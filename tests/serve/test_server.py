"""The OpenAI-compatible server against the official `openai` client, on a real uvicorn server on
127.0.0.1 (in a thread for most tests; in a subprocess for the queue bound and SIGTERM). Greedy outputs
must equal `LLM.generate` / `LLM.chat` on the same engine, streamed or not."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai  # noqa: E402  (dev and serve dependencies: the suite fails loudly without them)
import pytest
import uvicorn  # noqa: E402, F401  (the suite fails loudly without it)
from conftest import ThreadServer

from tessera import LLM, SamplingParams  # noqa: E402
from tessera.serve.app import build_app  # noqa: E402
from tessera.serve.async_engine import AsyncEngine  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 12
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a primary color."}],
]
CONCURRENT = [f"Step {i} of making bread is to" for i in range(16)] + [
    f"Fact {i} about the number {i}:" for i in range(16)
]
STOP_PROMPT, STOP = "Count with me: 1, 2, 3,", [", 7", "\n\n"]
KV_BYTES = 256 << 20


@dataclass
class Served:
    url: str
    llm: LLM
    engine: AsyncEngine
    refs: dict  # prompt -> RequestOutput (greedy, MAX_TOKENS)
    chat_refs: list
    stop_ref: object

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def served():
    llm = LLM(progress=False, max_model_len=2048, kv_cache_memory=KV_BYTES, max_num_seqs=64)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    prompts = PROMPTS + CONCURRENT
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    stop_ref = llm.generate(STOP_PROMPT, SamplingParams(temperature=0, max_tokens=24, stop=STOP), use_tqdm=False)[0]
    chat_refs = llm.chat(CHATS, greedy, use_tqdm=False)
    engine = AsyncEngine(llm.engine, max_waiting=1024)  # the server takes over the same engine
    with ThreadServer(build_app(engine, MODEL)) as url:
        yield Served(url, llm, engine, dict(zip(prompts, outs, strict=True)), chat_refs, stop_ref)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^tessera:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_idle(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "kv_cache_blocks_used") == 0 and metric(url, "num_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV blocks still in use: {metric(url, 'kv_cache_blocks_used')}")


def complete(client, prompt, stream: bool, **kw):
    """(text, finish_reason, usage) of one completion, streamed or not."""
    args = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    if not stream:
        r = client.completions.create(**args)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return text, finish, usage


def chat(client, messages, stream: bool, **kw):
    args = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage, roles = "", None, None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.choices:
            delta = chunk.choices[0].delta
            roles.append(delta.role)
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert roles[0] == "assistant"
    return text, finish, usage


def test_health_models_and_metrics_endpoints(served):
    assert httpx.get(served.url + "/health").status_code == 200
    models = served.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    text = httpx.get(served.url + "/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_blocks_used",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "prefix_cache_hit_rate",
    ):
        assert f"tessera:{name}" in text


def test_completions_match_llm_generate(served):
    client = served.client()
    jobs = [(p, s) for p in PROMPTS for s in (False, True)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(client, *job), jobs))
    for (prompt, stream), (text, finish, usage) in zip(jobs, results, strict=True):
        ref = served.refs[prompt]
        assert text == ref.text, (prompt, stream)
        assert finish == ref.finish_reason
        assert usage.completion_tokens == len(ref.token_ids)
        assert usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_matches_llm_chat(served):
    client = served.client()
    jobs = [(i, s) for i in range(len(CHATS)) for s in (False, True)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: chat(client, CHATS[job[0]], job[1]), jobs))
    for (i, stream), (text, finish, usage) in zip(jobs, results, strict=True):
        ref = served.chat_refs[i]
        assert text == ref.text, (i, stream)
        assert finish == ref.finish_reason
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))


def test_stop_string_streamed_equals_generate(served):
    client = served.client()
    for stream in (False, True):
        text, finish, _ = complete(client, STOP_PROMPT, stream, stop=STOP, max_tokens=24)
        assert (text, finish) == (served.stop_ref.text, served.stop_ref.finish_reason)
    assert served.stop_ref.finish_reason == "stop"  # the stop string did fire mid-stream


def test_stop_string_before_min_tokens_streamed_equals_generate(served):
    """A stop string that shows up before min_tokens neither stops the request nor cuts the text
    back later: streamed and non-streamed text agree, and agree with the tokens."""
    client = served.client()
    args = dict(stop=["."], max_tokens=16, logprobs=0, extra_body={"min_tokens": 5})
    (text, finish, usage), (s_text, s_finish, s_usage) = (complete(client, PROMPTS[0], s, **args) for s in (0, 1))
    assert (s_text, s_finish, s_usage.completion_tokens) == (text, finish, usage.completion_tokens)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, **args)
    tokens = r.choices[0].logprobs.tokens
    assert r.choices[0].text == text and len(tokens) == usage.completion_tokens
    head, full = "".join(tokens[:5]), "".join(tokens)
    assert head == " Paris.\n\nThe"  # the '.' comes before min_tokens: it does not count
    assert text == (full if finish == "length" else full[: full.index(".", len(head))])


@pytest.mark.parametrize("seed", [2**62, 2**70, -(2**70), 10**30])
def test_any_integer_seed_is_accepted(served, seed):
    """The engine takes any integer seed (choice i uses (seed + i * golden ratio) mod 2**64), so the
    server does too; the same seed repeats its choices."""
    client = served.client()
    args = dict(model=MODEL, prompt=PROMPTS[2], n=2, max_tokens=6, temperature=1.0, seed=seed)
    a = [c.text for c in client.completions.create(**args).choices]
    b = [c.text for c in client.completions.create(**args).choices]
    assert a == b and len(a) == 2


def test_lone_surrogate_is_a_400_that_names_it(served):
    for path, body in (("/v1/completions", '{"prompt": "x\\ud800"}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\udc00y"}]}')):
        r = httpx.post(served.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "lone surrogate" in err["message"] and "TypeError" not in err["message"]
        assert "TextEncodeInput" not in err["message"]
        assert err["param"] == ("prompt" if path == "/v1/completions" else "messages")


def test_logprobs_of_non_ascii_tokens(served):
    """Tokens that are part of a character: chat `bytes` are the token's own UTF-8 bytes (they add up to
    the text), and completions `text_offset` counts characters of the text."""
    client = served.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello in Japanese."}],
                                       max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert any(ord(ch) > 0x7F for ch in text) and len(content) == 12
    assert b"".join(bytes(c.bytes) for c in content) == text.encode()
    for c in content:
        assert c.top_logprobs[0].bytes == c.bytes  # greedy: the chosen token is the top one

    args = dict(model=MODEL, prompt="Tokyo in Japanese is written as", max_tokens=8, temperature=0, logprobs=1)
    c = client.completions.create(**args).choices[0]
    text, offsets, tokens = c.text, c.logprobs.text_offset, c.logprobs.tokens
    assert any(ord(ch) > 0x7F for ch in text) and any("\ufffd" in t for t in tokens)  # some tokens split a character
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    for off, tok in zip(offsets, tokens, strict=True):
        if "\ufffd" not in tok:
            assert text[off : off + len(tok)] == tok, (off, tok, text)
    streamed = [
        off
        for chunk in client.completions.create(stream=True, **args)
        for ch in chunk.choices
        for off in (ch.logprobs.text_offset if ch.logprobs else [])
    ]
    assert streamed == offsets


def test_token_id_prompts_batch_and_n(served):
    client = served.client()
    ids = [served.refs[p].prompt_token_ids for p in PROMPTS[:2]]
    r = client.completions.create(model=MODEL, prompt=ids, n=2, max_tokens=MAX_TOKENS, temperature=0)
    got = {c.index: c.text for c in r.choices}
    assert got == {
        0: served.refs[PROMPTS[0]].text,
        1: served.refs[PROMPTS[0]].text,
        2: served.refs[PROMPTS[1]].text,
        3: served.refs[PROMPTS[1]].text,
    }
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    # seeded sampling: n choices differ from one another but repeat exactly across calls
    args = dict(model=MODEL, messages=CHATS[0], n=3, max_tokens=8, temperature=1.0, seed=7)
    a = [c.message.content for c in client.chat.completions.create(**args).choices]
    b = [c.message.content for c in client.chat.completions.create(**args).choices]
    assert a == b and len(a) == 3


def test_echo_prepends_the_prompt(served):
    client = served.client()
    ref = served.refs[PROMPTS[0]]
    for stream in (False, True):
        text, _, _ = complete(client, PROMPTS[0], stream, echo=True)
        assert text == PROMPTS[0] + ref.text


def test_logprobs_completions_and_chat(served):
    client = served.client()
    args = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    r = client.completions.create(**args)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the top one
        assert top[tok] == pytest.approx(logprob)
    streamed = [
        t
        for chunk in client.completions.create(stream=True, **args)
        for c in chunk.choices
        for t in (c.logprobs.tokens if c.logprobs else [])
    ]
    assert streamed == lp.tokens

    r = client.chat.completions.create(
        model=MODEL, messages=CHATS[0], max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob


def test_32_concurrent_streaming_clients(served):
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    async def one(prompt: str) -> tuple[str, str]:
        text, finish = "", None
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in CONCURRENT))
        finally:
            await client.close()

    steps0 = metric(served.url, "engine_steps_total")
    results = asyncio.run(main())
    for prompt, (text, finish) in zip(CONCURRENT, results, strict=True):
        assert (text, finish) == (served.refs[prompt].text, served.refs[prompt].finish_reason), prompt
    assert sum(len(text) > 0 for text, _ in results) >= 28  # real outputs, not just EOS
    # they were batched: far fewer steps than 32 requests x 12 tokens one by one
    assert metric(served.url, "engine_steps_total") - steps0 < 32 * MAX_TOKENS / 2
    wait_idle(served.url)


def test_client_disconnect_frees_kv_blocks(served):
    wait_idle(served.url)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:  # (leaving this loop closes the generator, and with it the connection)
                assert metric(served.url, "kv_cache_blocks_used") > 0
                break
    # the stream is closed mid-way: the request is aborted and its blocks come back
    wait_idle(served.url)
    assert served.engine.num_open == 0
    # a non-streamed request whose client times out is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_idle(served.url)
    assert served.engine.num_open == 0


BAD = [
    ("/v1/completions", "{not json", 400, "Invalid JSON"),
    ("/v1/completions", "[1, 2]", 400, "valid dictionary"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"prompt": "hi", "n": 100000}, 400, "n must be at most"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", '{"prompt": "a\\ud800b"}', 400, "lone surrogate"),
    ("/v1/completions", '{"prompt": ["fine", "\\udfff"]}', 400, "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "lone surrogate"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9], "min_tokens": 1}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias value 500"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": [5] * 3000}, 400, "context length is 2048 tokens. However, your request has 3000"),
    (
        "/v1/completions",
        {"prompt": [5, 6, 7], "max_tokens": 2046},
        400,
        "you requested 2049 tokens (3 in the prompt, 2046 in the completion)",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 10**6}, 400, "maximum context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ("/v1/chat/completions", {"messages": CHATS[0], "top_logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": CHATS[0], "model": "nope"}, 404, "does not exist"),
    ("/v1/nothing-here", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error_and_server_keeps_serving(served, path, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]
    good = httpx.post(
        served.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}, timeout=60
    )
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"


def test_odd_but_valid_values_are_accepted(served):
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 2,
        "n": None,
        "temperature": None,
        "top_k": 2**70,
        "seed": -(2**40),
        "stop": None,
        "stream": None,
        "logprobs": None,
    }
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_openai_client_raises_typed_errors(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-2)
    assert e.value.body["param"] == "temperature"


def test_engine_step_failure_fails_requests_not_server(served):
    wait_idle(served.url)
    eng = served.llm.engine
    real_step, calls = eng.step, [0]

    def flaky_step():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure")
        return real_step()

    eng.step = flaky_step
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]"
        assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "error"
        assert "injected failure" in chunks[-1]["error"]["message"]
    finally:
        del eng.step
    assert served.engine.step_failures == 1
    wait_idle(served.url)
    text, finish, _ = complete(served.client(), PROMPTS[0], stream=False)
    assert text == served.refs[PROMPTS[0]].text


def test_bench_serve_load_against_server(served):
    from tessera.bench.serve import run_load, sample_random, summarize

    reqs = sample_random(8, 16, 4, 0.0, vocab_size=served.llm.engine.model_config.vocab_size)
    results, duration = asyncio.run(
        run_load(served.url, MODEL, reqs, request_rate=20.0, max_concurrency=4, ignore_eos=True)
    )
    out = summarize(results, duration)
    assert out["completed"] == 8 and out["failed"] == 0
    assert out["total_output_tokens"] == 32 and out["total_input_tokens"] == 8 * 16
    assert 0 < out["median_ttft_ms"] <= out["median_e2el_ms"] and out["mean_tpot_ms"] > 0


def test_metrics_reflect_traffic(served):
    url = served.url
    assert metric(url, "time_to_first_token_seconds_count") > 0
    assert metric(url, "e2e_request_latency_seconds_count") > 0
    assert metric(url, "time_per_output_token_seconds_count") > 0
    assert metric(url, "prompt_tokens_total") > 0 and metric(url, "generation_tokens_total") > 0
    assert metric(url, "kv_cache_blocks_total") == served.llm.engine.block_manager.num_blocks
    assert 0 <= metric(url, "prefix_cache_hit_rate") <= 1


# -- a real `tessera serve` process -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "serve",
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--kv-cache-memory",
            str(KV_BYTES),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    from tessera.bench.serve import wait_ready

    try:
        wait_ready(url, proc, timeout=180)
    except Exception:
        proc.kill()
        raise AssertionError((tmp_path / "server.log").read_text()) from None
    return proc, url


class Stream(threading.Thread):
    """A streamed completion read in a background thread; `first` is set at its first chunk, and
    setting `release` makes the client disconnect."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first, self.release = threading.Event(), threading.Event()
        self.events, self.status, self.finish = [], None, None

    def run(self):
        try:
            with httpx.stream(
                "POST", self.url + "/v1/completions", json={**self.body, "stream": True}, timeout=120
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    self.events.append(line[6:])
                    self.first.set()
                    if line[6:] != "[DONE]":
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        self.finish = choices[0].get("finish_reason") or self.finish
                    if self.release.is_set():
                        return  # disconnect
        finally:
            self.first.set()


def test_serve_flags_api_key_served_names_and_chat_template(tmp_path):
    """`tessera serve --api-key --served-model-name a b --chat-template FILE` wires all three."""
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    proc, url = start_server(tmp_path, "--api-key", "sekret", "--served-model-name", "one", "two",
                             "--chat-template", str(template))
    auth = {"Authorization": "Bearer sekret"}
    try:
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth, timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["one", "two"]
        body = {"model": "two", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}
        ids = httpx.post(url + "/tokenize", json=body, headers=auth, timeout=30).json()["tokens"]
        text = httpx.post(url + "/detokenize", json={"tokens": ids}, headers=auth, timeout=30).json()["prompt"]
        assert text == "[user] hi\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_queue_full_429_and_sigterm_graceful_shutdown(tmp_path):
    proc, url = start_server(tmp_path, "--max-num-seqs", "1", "--max-waiting", "1", "--shutdown-grace", "4")
    try:
        long_body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
        short_body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        # A runs (the only seat), B waits (the only waiting place): C is refused with 429.
        a = Stream(url, long_body)
        a.start()
        assert a.first.wait(60) and a.status == 200
        with cf.ThreadPoolExecutor(1) as pool:
            b = pool.submit(httpx.post, url + "/v1/completions", json=short_body, timeout=120)
            deadline = time.monotonic() + 30
            while metric(url, "num_requests_waiting") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            c = httpx.post(url + "/v1/completions", json=short_body, timeout=60)
            assert c.status_code == 429 and c.json()["error"]["code"] == "queue_full"
            a.release.set()  # A disconnects: B gets the seat
            a.join(60)
            assert b.result().status_code == 200
        d = httpx.post(url + "/v1/completions", json=short_body, timeout=60)
        assert d.status_code == 200
        wait_idle(url)

        # SIGTERM: E (short, running) finishes, F (long, queued behind it) is aborted after the grace.
        e = Stream(url, {**short_body, "max_tokens": 8, "ignore_eos": True})
        e.start()
        assert e.first.wait(60)
        f = Stream(url, long_body)
        f.start()
        while metric(url, "num_requests_waiting") + metric(url, "num_requests_running") < 2:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        g = httpx.post(url + "/v1/completions", json=short_body, timeout=60)
        assert g.status_code == 503 and g.json()["error"]["code"] == "shutting_down"
        assert httpx.get(url + "/health").status_code == 503
        e.join(60)
        f.join(60)
        assert e.finish == "length" and e.events[-1] == "[DONE]"
        assert f.finish == "abort" and f.events[-1] == "[DONE]"
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < 4 + 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- soak -----------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


@pytest.mark.slow
def test_soak_fixed_rate_nothing_lost_memory_flat(tmp_path):
    """2,000 short ShareGPT requests at a fixed rate: every one completes or gets a clear error, and
    the server's RSS stays flat after warm-up."""
    from tessera.bench.serve import BenchRequest, load_sharegpt_pairs, run_load, sample_sharegpt
    from tessera.models.loader import resolve_model_path
    from tessera.tokenizer import load_tokenizer

    total = int(os.environ.get("TESSERA_SOAK_REQUESTS", "2000"))
    rate = float(os.environ.get("TESSERA_SOAK_RATE", "10"))
    tok = load_tokenizer(resolve_model_path(None))
    sampled = sample_sharegpt(load_sharegpt_pairs(), tok, total, seed=1)
    reqs = [BenchRequest(tok.encode(r.prompt)[:32], min(r.prompt_len, 32), 4) for r in sampled]
    proc, url = start_server(tmp_path, "--max-num-seqs", "64", "--max-waiting", "100000")
    try:
        rss, results = [], []
        phases = 8  # RSS after each; the first two (a quarter of the run) warm the allocator up
        for k in range(phases):
            part = reqs[k * total // phases : (k + 1) * total // phases]
            res, _ = asyncio.run(run_load(url, MODEL, part, request_rate=rate, seed=k, ignore_eos=True))
            results += res
            rss.append(rss_mb(proc.pid))
        assert len(results) == total
        lost = [r for r in results if not r.success and not r.error.startswith("HTTP ")]
        assert not lost, lost[:3]
        assert sum(r.success for r in results) >= 0.99 * total
        assert all(r.output_tokens == 4 for r in results if r.success)
        assert max(rss[2:]) - rss[1] < 64, rss
        wait_idle(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
