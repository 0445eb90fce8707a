"""lm-evaluation-harness (from PyPI) against the server, on the two local tasks in tests/data/lm_eval:
`local-completions` on the multiple-choice loglikelihood task (echo + logprobs, tokenized through the
server's /tokenizer_info and /tokenize, no hub) gives the same accuracy and the same choice on every
item as lm-eval's `hf` backend on the same weights; `local-chat-completions` runs the generate_until
task. The default model in fp32. docs/benchmarks.md records the scores and the CLI commands."""

from __future__ import annotations

from pathlib import Path

import httpx
import lm_eval  # noqa: E402  (a dev dependency: the suite fails loudly without it)
import pytest
import torch
from conftest import ThreadServer
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
from lm_eval.tasks import TaskManager
from lm_eval.utils import check_remote_tokenizer_support

from tessera import LLM
from tessera.serve.app import build_app
from tessera.serve.async_engine import AsyncEngine

MODEL = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval"
MC, GEN = "tessera_facts_mc", "tessera_numbers_gen"


@pytest.fixture(scope="module")
def served():
    llm = LLM(progress=False, max_model_len=2048, kv_cache_memory=128 << 20, max_num_seqs=16)
    assert llm.engine.dtype == torch.float32
    with ThreadServer(build_app(AsyncEngine(llm.engine), MODEL)) as url:
        yield url, llm


def evaluate(lm, task: str, monkeypatch, **kw) -> tuple[dict, list[dict]]:
    """(metrics, per-item samples by doc_id) of one lm-eval run; the tasks' data paths are relative to
    the repository root, as on the command line."""
    monkeypatch.chdir(REPO)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), **kw)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def choices(samples: list[dict]) -> list[int]:
    picks = []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        picks.append(lls.index(max(lls)))
    return picks


def test_tokenizer_info_answers_lm_evals_probe(served):
    url, llm = served
    info = httpx.get(url + "/tokenizer_info").json()
    tok = llm.engine.tokenizer
    assert info["eos_token"] == tok.eos_token == "<|im_end|>" and info["bos_token"] == tok.bos_token
    assert info["tokenizer_class"] == type(tok).__name__ and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 2048 and "name_or_path" not in info
    assert check_remote_tokenizer_support(url + "/v1/completions")


def test_local_completions_equal_hf_backend(served, monkeypatch):
    url, llm = served
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model=MODEL, num_concurrent=1, max_retries=1)
    assert lm.tokenizer_backend == "remote"  # /tokenizer_info answered: nothing asked of the hub
    got, samples = evaluate(lm, MC, monkeypatch)
    ref, ref_samples = evaluate("hf", MC, monkeypatch, device="cpu", batch_size=8,
                                model_args=f"pretrained={llm.engine.model_path},dtype=float32")
    assert len(samples) == len(ref_samples) == 20
    assert choices(samples) == choices(ref_samples)
    assert got["acc,none"] == ref["acc,none"] >= 0.5
    for s, r in zip(samples, ref_samples, strict=True):  # the loglikelihoods themselves agree too
        for a, b in zip(s["filtered_resps"], r["filtered_resps"], strict=True):
            assert abs(float(a[0]) - float(b[0])) < 1e-3


def test_local_chat_completions_generate_until(served, monkeypatch):
    url, _ = served
    lm = LocalChatCompletion(base_url=url + "/v1/chat/completions", model=MODEL, num_concurrent=1, max_retries=1)
    got, samples = evaluate(lm, GEN, monkeypatch, apply_chat_template=True)
    assert len(samples) == 20 and all(s["resps"][0][0].strip() for s in samples)
    assert got["exact_match,last-number"] == sum(s["exact_match"] for s in samples) / 20 >= 0.4
