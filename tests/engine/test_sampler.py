"""The sampler: exclusions, distributions, seeds, penalties, logprobs, stops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.sampler import Sampler, _filter_top_k_top_p_min_p
from tessera.engine.sequence import Sequence

# A fixed toy distribution over 8 tokens.
PROBS = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
LOGITS = PROBS.log()


def draw(params: SamplingParams, n: int = 20000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    sampler = Sampler(seed=0)
    seqs = [Sequence(i, "r", 0, [1], params) for i in range(n)]
    return torch.tensor(sampler(logits.expand(n, -1).clone(), seqs).token_ids)


def expected(keep: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    p = torch.where(keep, (LOGITS / temperature).softmax(-1), 0.0)
    return p / p.sum()


def chi2_ok(samples: torch.Tensor, probs: torch.Tensor) -> bool:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    n = counts.sum()
    mask = probs > 0
    exp = probs.double()[mask] * n
    chi2 = (((counts[mask] - exp) ** 2) / exp).sum().item()
    dof = int(mask.sum()) - 1
    # 99.9% quantile of chi-square, Wilson-Hilferty approximation.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 0.0
    return chi2 <= crit + 1e-9


@pytest.mark.parametrize("params,keep", [
    (dict(top_k=3), [1, 1, 1, 0, 0, 0, 0, 0]),
    (dict(top_p=0.6), [1, 1, 1, 0, 0, 0, 0, 0]),  # 0.30+0.20 < 0.6, adding 0.15 reaches it
    (dict(min_p=0.4), [1, 1, 1, 0, 0, 0, 0, 0]),  # >= 0.12 = 0.4 * 0.30
    # top-p over the top-k renormalised (HF, vLLM): 0.30, 0.20, 0.15 -> 0.46, 0.31, 0.23, and 0.46 + 0.31
    # already reaches 0.6. Over the unfiltered distribution (0.30 + 0.20 < 0.6) the third would stay.
    (dict(top_k=3, top_p=0.6), [1, 1, 0, 0, 0, 0, 0, 0]),
    (dict(), [1] * 8),
])
def test_filters_exclude_and_match_distribution(params, keep):
    keep = torch.tensor(keep, dtype=torch.bool)
    samples = draw(SamplingParams(temperature=1.0, **params))
    assert not torch.isin(samples, torch.nonzero(~keep).flatten()).any(), "an excluded token was emitted"
    assert chi2_ok(samples, expected(keep))


def test_temperature_shapes_distribution():
    samples = draw(SamplingParams(temperature=0.5))
    assert chi2_ok(samples, expected(torch.ones(8, dtype=torch.bool), 0.5))


def test_filter_function_keeps_top_token_always():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    out = _filter_top_k_top_p_min_p(logits, torch.tensor([1]), torch.tensor([0.01]), torch.tensor([0.99]))
    assert out[0, 1] == 5.0 and torch.isinf(out[0, [0, 2]]).all()


def test_top_k_then_top_p_keeps_what_hf_warpers_keep():
    """Per row, the surviving tokens are exactly those HF's TopKLogitsWarper then TopPLogitsWarper keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    rows, vocab = 64, 300
    logits = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 4.0, rows)[:, None]
    top_k = torch.randint(1, vocab + 1, (rows,), generator=g)
    top_k[::4] = vocab  # top-p alone
    top_p = torch.rand(rows, generator=g).clamp(min=0.05)
    top_p[1::4] = 1.0  # top-k alone
    ours = _filter_top_k_top_p_min_p(logits, top_k, top_p, torch.zeros(rows))
    differs = 0
    for r in range(rows):
        row = logits[r : r + 1].clone()
        row = TopKLogitsWarper(int(top_k[r]))(None, row)
        row = TopPLogitsWarper(float(top_p[r]))(None, row)
        hf_keep = torch.isfinite(row[0])
        assert torch.equal(torch.isfinite(ours[r]), hf_keep), f"row {r}: k={int(top_k[r])} p={float(top_p[r]):.3f}"
        assert torch.equal(ours[r][hf_keep], logits[r][hf_keep])  # survivors keep their logits
        # Each filter alone over the unfiltered distribution, intersected: keeps more where the order matters.
        one = logits[r : r + 1]
        k_only = _filter_top_k_top_p_min_p(one, top_k[r : r + 1], torch.ones(1), torch.zeros(1))[0]
        p_only = _filter_top_k_top_p_min_p(one, torch.tensor([vocab]), top_p[r : r + 1], torch.zeros(1))[0]
        differs += int(not torch.equal(torch.isfinite(k_only) & torch.isfinite(p_only), hf_keep))
    assert differs > 0  # some rows do tell the two orders apart


def test_penalties_change_logits_as_defined():
    from tessera.engine.sampler import apply_penalties

    seq = Sequence(0, "r", 0, [1, 2], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                                     frequency_penalty=0.25))
    seq.token_ids += [3, 3]
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 1.0]])
    apply_penalties(logits, [seq])
    # token 1 (prompt): 2/2; token 2 (prompt): -2*2; token 3 (output twice): 4/2 - 0.25*2 - 0.5
    assert torch.allclose(logits, torch.tensor([[1.0, 1.0, -4.0, 1.0, 1.0]]))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir("llama")), progress=False)


def test_seeded_sampling_reproducible_across_batches(llm):
    prompts = random_prompts([10, 40, 25, 77], seed=5)
    sp = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp, use_tqdm=False)[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(prompts, [sp, unseeded, unseeded, unseeded], use_tqdm=False)[0].token_ids
    small = LLM(str(llm.engine.model_path), progress=False, max_num_batched_tokens=16)
    chunked = small.generate(prompts[:2], [unseeded, sp], use_tqdm=False)
    assert alone == mixed
    assert chunked[1].token_ids == llm.generate([prompts[1]], sp, use_tqdm=False)[0].token_ids
    other = llm.generate([prompts[0]], SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=99,
                                                      ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other != alone


def test_n_completions_and_logprobs(llm):
    p = random_prompts([12], seed=6)[0]
    out = llm.generate([p], SamplingParams(n=3, temperature=1.0, max_tokens=8, logprobs=2, seed=7,
                                           ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == 8
        for tok, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert tok in entry and entry[tok].logprob <= 0
            assert len(entry) >= 2
            assert all(lp.rank >= 1 for lp in entry.values())
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs,
                                                                                         strict=True)), rel=1e-5)


def test_greedy_logprobs_are_top1(llm):
    p = random_prompts([12], seed=8)[0]
    c = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=1, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert all(e[t].rank == 1 for t, e in zip(c.token_ids, c.logprobs, strict=True))


def test_stop_token_ids_and_min_tokens(llm):
    p = random_prompts([12], seed=9)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    # min_tokens forbids the stop token early, so the output is longer.
    late = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2,
                                            stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert len(late.token_ids) >= first + 2
    assert stop_at not in late.token_ids[:first + 2]


def test_eos_stops_unless_ignored(llm):
    p = random_prompts([12], seed=9)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    eos = free.token_ids[2]
    llm.engine.model_config.__dict__["eos_token_ids"] = (eos,)  # pretend this token is the model's EOS
    try:
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        ignored = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)[0]
    finally:
        llm.engine.model_config.__dict__["eos_token_ids"] = (2,)
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert len(out.token_ids) == free.token_ids.index(eos) + 1
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


@pytest.mark.parametrize("kw,match", [
    (dict(stop_token_ids=[10**6], min_tokens=2), "outside the vocabulary"),
])
def test_bad_params_rejected_before_work(llm, kw, match):
    from tessera import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([[5, 6]], SamplingParams(max_tokens=4, **kw), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_extreme_seed_and_top_k_are_handled(llm):
    outs = llm.generate([[5, 6], [7, 8]], [SamplingParams(seed=-(2**62), max_tokens=3, n=2),
                                           SamplingParams(seed=2**70, top_k=2**70, max_tokens=3)], use_tqdm=False)
    assert all(len(c.token_ids) == 3 for o in outs for c in o.outputs)


@pytest.mark.gpu
def test_sampling_on_a_gpu_draws_from_the_cpu_generators(model_dir):
    """The generators live on the CPU whatever the device: sampling on a GPU runs, a seed repeats its
    tokens whatever shares the batch, and unseeded rows sample too."""
    llm = LLM(str(model_dir("llama")), progress=False, device="cuda", dtype="float32")
    prompts = random_prompts([10, 40, 25], seed=5)
    sp = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    unseeded = SamplingParams(temperature=0.6, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp, use_tqdm=False)[0].token_ids
    mixed = llm.generate(prompts, [sp, unseeded, unseeded], use_tqdm=False)
    assert mixed[0].token_ids == alone and all(len(o.token_ids) == 20 for o in mixed)
