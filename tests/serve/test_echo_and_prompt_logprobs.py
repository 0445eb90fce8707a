"""Prompt logprobs through the server, with the official `openai` client, on the default model in fp32:
completions echo + logprobs + max_tokens=0 (what lm-eval's local-completions sends for loglikelihood)
and vLLM's `prompt_logprobs` field (completions and chat) equal the logits path (HF transformers on the
whole prompt, log_softmax) within 1e-4."""

from __future__ import annotations

import httpx
import openai  # noqa: E402  (dev and serve dependencies: the suite fails loudly without them)
import pytest
import torch
from conftest import ThreadServer, load_hf

from tessera import LLM
from tessera.serve.app import build_app
from tessera.serve.async_engine import AsyncEngine
from tessera.tokenizer import apply_chat_template

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris, and the capital of Germany is"
TOL = 1e-4


@pytest.fixture(scope="module")
def served():
    llm = LLM(progress=False, max_model_len=512, kv_cache_memory=64 << 20, max_num_seqs=8)
    assert llm.engine.dtype == torch.float32
    hf = load_hf(llm.engine.model_path)
    with ThreadServer(build_app(AsyncEngine(llm.engine), MODEL)) as url:
        yield url, llm, hf


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def reference(hf, ids: list[int]) -> torch.Tensor:
    """[len, vocab]: row q is the distribution token q + 1 was drawn from (fp32 log_softmax)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_prompt_entries(token_logprobs, top_logprobs, ids: list[int], ref: torch.Tensor, top: int, tok) -> None:
    """Legacy completions logprobs over an echoed prompt: null first, then the logits path's values."""
    assert token_logprobs[0] is None and top_logprobs[0] is None
    for q in range(1, len(ids)):
        assert abs(token_logprobs[q] - ref[q - 1, ids[q]].item()) < TOL, q
        best = ref[q - 1].topk(top)
        for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            assert abs(top_logprobs[q][tok.decode([t])] - v) < TOL, q


def test_echo_logprobs_max_tokens_zero_equal_the_logits_path(served):
    url, llm, hf = served
    tok = llm.engine.tokenizer
    ids = tok.encode(PROMPT)
    r = client(url).completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0,
                                       temperature=0)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    check_prompt_entries(lp.token_logprobs, lp.top_logprobs, ids, reference(hf, ids), 2, tok)


def test_token_id_prompts_like_lm_eval(served):
    """lm-eval's loglikelihood request: token-id prompts in a batch, echo, logprobs=1, max_tokens=1; the
    prompt's logprobs come first, then the one generated token's."""
    url, llm, hf = served
    tok = llm.engine.tokenizer
    batch = [tok.encode(PROMPT), tok.encode("Question: 2 + 2 = ? Answer: 4")]
    r = client(url).completions.create(model=MODEL, prompt=batch, echo=True, logprobs=1, max_tokens=1,
                                       temperature=0, seed=1234)
    for ids, c in zip(batch, sorted(r.choices, key=lambda c: c.index), strict=True):
        ref = reference(hf, ids)
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        check_prompt_entries(lp.token_logprobs[:-1], lp.top_logprobs[:-1], ids, ref, 1, tok)
        greedy = int(ref[-1].argmax())
        assert lp.tokens[-1] == tok.decode([greedy]) and abs(lp.token_logprobs[-1] - ref[-1, greedy].item()) < TOL
        assert c.text == tok.decode(ids) + tok.decode([greedy])


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_streamed_echo_logprobs_equal_non_streamed(served, max_tokens):
    url, _, _ = served
    args = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0)
    whole = client(url).completions.create(**args).choices[0]
    text, tokens, lps = "", [], []
    for chunk in client(url).completions.create(stream=True, **args):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs:
            tokens += c.logprobs.tokens
            lps += c.logprobs.token_logprobs
    assert text == whole.text and text.startswith(PROMPT)
    assert tokens == whole.logprobs.tokens and lps == whole.logprobs.token_logprobs and lps[0] is None
    assert len(tokens) == len(served[1].engine.tokenizer.encode(PROMPT)) + max_tokens


def test_prompt_logprobs_field_completions_and_chat(served):
    url, llm, hf = served
    tok = llm.engine.tokenizer
    ids = tok.encode(PROMPT)
    r = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                       extra_body={"prompt_logprobs": 3})
    got = r.choices[0].model_extra["prompt_logprobs"]
    ref = reference(hf, ids)
    plain = client(url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).choices[0]
    assert r.choices[0].text == plain.text and plain.model_extra.get("prompt_logprobs") is None
    check_vllm_shape(got, ids, ref, 3, tok)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = apply_chat_template(tok, messages, True)
    r = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                            extra_body={"prompt_logprobs": 0})
    check_vllm_shape(r.model_extra["prompt_logprobs"], chat_ids, reference(hf, chat_ids), 0, tok)


def check_vllm_shape(got, ids: list[int], ref: torch.Tensor, top: int, tok) -> None:
    """vLLM's prompt_logprobs JSON: null, then {"token_id": {logprob, rank, decoded_token}} per token."""
    assert len(got) == len(ids) and got[0] is None
    for q in range(1, len(ids)):
        entry = got[q]
        assert str(ids[q]) in entry and len(entry) in (top, top + 1)
        for t, v in entry.items():
            assert abs(v["logprob"] - ref[q - 1, int(t)].item()) < TOL
            assert v["decoded_token"] == tok.decode([int(t)])
        own = entry[str(ids[q])]
        row = ref[q - 1]
        assert (row > row[ids[q]] + TOL).sum() + 1 <= own["rank"] <= (row > row[ids[q]] - TOL).sum() + 1


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # nothing to generate and nothing to score
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "hi", "echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
])
def test_bad_prompt_logprobs_requests_are_400s_naming_the_field(served, body, param):
    url, _, _ = served
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "echo": True, "max_tokens": 0})
    assert ok.status_code == 200
    choice = ok.json()["choices"][0]  # an echo without generation: the prompt, nothing else asked for
    assert choice["text"] == "hi" and choice["logprobs"] is None and choice["prompt_logprobs"] is None
