"""SamplingParams.prompt_logprobs: every prompt token's logprob (and rank, top-N) equals the logits path's
(HF on the whole sequence, log_softmax in fp32) within 1e-4, whatever the chunking, preemption or prefix
caching, each position scored once; max_tokens=0 scores the prompt and generates nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import load_hf, random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tessera.errors import InvalidRequestError

TOP = 3
TOL = 1e-4


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """[len - 1, vocab]: row q - 1 is the distribution prompt token q was drawn from."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check(prompt_logprobs, prompt: list[int], ref: torch.Tensor, top: int) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for q in range(1, len(prompt)):
        entry, row, tok = prompt_logprobs[q], ref[q - 1], prompt[q]
        assert tok in entry and len(entry) in (top, top + 1), (q, entry)
        own = entry[tok]
        assert abs(own.logprob - row[tok].item()) < TOL, q
        # the rank, up to ties closer than the tolerance
        assert (row > row[tok] + TOL).sum() + 1 <= own.rank <= (row > row[tok] - TOL).sum() + 1, q
        for t, lp in entry.items():
            assert lp.token_id == t and abs(lp.logprob - row[t].item()) < TOL
        tops = sorted((lp.logprob for lp in entry.values() if lp.rank <= top), reverse=True)[:top]
        torch.testing.assert_close(torch.tensor(tops), row.topk(top).values, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def qwen(model_dir):
    path = model_dir("qwen3")
    return path, load_hf(path)


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16, block_size=4)], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_the_logits_path(qwen, kw):
    path, hf = qwen
    prompts = random_prompts([40, 7, 90, 2], seed=11)
    llm = LLM(str(path), progress=False, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = llm.generate(prompts, greedy, use_tqdm=False)
    # Now every prompt is in the prefix cache: a prompt_logprobs request must still score its whole prompt.
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, ref_out in zip(prompts, outs, plain, strict=True):
        check(out.prompt_logprobs, prompt, reference(hf, prompt), TOP)
        assert out.token_ids == ref_out.token_ids  # asking for prompt logprobs changes no greedy result
        assert out.prompt_logprobs[1][prompt[1]].decoded_token is None  # no tokenizer: nothing to decode
    assert plain[0].prompt_logprobs is None
    # A prefix shared with a cached prompt is served from the cache only where nothing is to be scored.
    again = llm.generate(prompts[2], greedy, use_tqdm=False)[0]
    assert again.metrics["num_cached_tokens"] > 0 and again.token_ids == plain[2].token_ids
    assert llm.engine.block_manager.num_used_blocks == 0


def test_preemption_scores_each_position_once(qwen, monkeypatch):
    path, hf = qwen
    scored: list[tuple[int, int]] = []
    orig = ModelRunner._score

    def spy(self, hidden, rows):
        scored.extend((seq.seq_id, p) for seq, p, _ in rows if p < len(seq.prompt_logprobs))
        return orig(self, hidden, rows)

    monkeypatch.setattr(ModelRunner, "_score", spy)
    prompts = random_prompts([90, 150, 64, 47, 120], seed=12)
    probe = LLM(str(path), progress=False)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model_config, 16, probe.engine.dtype)
    llm = LLM(str(path), progress=False, kv_cache_memory=30 * per_block, max_num_batched_tokens=48,
              prefix_planning="off")
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.total_preemptions > 0
    assert len(scored) == len(set(scored)) == sum(len(p) - 1 for p in prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        check(out.prompt_logprobs, prompt, reference(hf, prompt), 1)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_max_tokens_zero_scores_the_prompt_only(qwen):
    path, hf = qwen
    llm = LLM(str(path), progress=False, max_model_len=64, max_num_batched_tokens=16)
    # the second fills the whole context, nothing left to generate; the third has nothing to score
    prompts = random_prompts([30, 64, 1], seed=13)
    outs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.finish_reason == "length" and out.token_ids == [] and out.text == ""
        assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # prompt_logprobs=0: the token's own only
        check(out.prompt_logprobs, prompt, reference(hf, prompt), 0)
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks == 0
    assert llm.engine.stats["generation_tokens"] == 0


@pytest.mark.parametrize("kw,needle", [
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs="2"), "prompt_logprobs"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1, prompt_logprobs=0), "max_tokens"),
])
def test_invalid_prompt_logprobs(kw, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(**kw)
