"""logit_bias, allowed_token_ids, bad_words (tessera.engine.token_constraints) and best_of, on toy
logits and on the default model."""

from __future__ import annotations

import pytest
import torch

from tessera import LLM, SamplingParams
from tessera.engine.sampler import Sampler
from tessera.engine.sequence import Sequence
from tessera.engine.token_constraints import TokenConstraints, apply_token_constraints, bad_words_token_ids
from tessera.errors import InvalidRequestError

VOCAB = 8


class WordTokenizer:
    """Each space-separated word is one token; "ab" is two ("a", "b"), as a word split into pieces."""

    ids = {"a": 1, "b": 2, "c": 3, " a": 4, " b": 5, " c": 6}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text.startswith(" "):
            return [self.ids[" " + text[1]]] + [self.ids[ch] for ch in text[2:]]
        return [self.ids[ch] for ch in text]


def seq_with(params: SamplingParams, output: list[int] = (), prompt: list[int] = (7,)) -> Sequence:
    seq = Sequence(0, "r", 0, list(prompt), params)
    seq.token_ids += list(output)
    seq.constraints = TokenConstraints.build(params, WordTokenizer(), VOCAB)
    return seq


def test_logit_bias_adds_to_its_tokens_and_leaves_other_rows_bit_identical():
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    seqs = [seq_with(SamplingParams(logit_bias={"3": 5.5, 0: -100})), seq_with(SamplingParams()),
            seq_with(SamplingParams(logit_bias={7: 1}))]
    apply_token_constraints(logits, seqs)
    want = before.clone()
    want[0, 3] += 5.5
    want[0, 0] -= 100
    want[2, 7] += 1
    assert torch.equal(logits, want)


def test_allowed_token_ids_only_those_can_be_drawn():
    n = 4000
    params = SamplingParams(temperature=1.0, allowed_token_ids=[2, 5], seed=None)
    seqs = [seq_with(params) for _ in range(n)]
    logits = torch.zeros(n, VOCAB)
    drawn = torch.tensor(Sampler(seed=0)(logits, seqs).token_ids)
    assert set(drawn.tolist()) == {2, 5}
    assert 0.45 < (drawn == 2).float().mean() < 0.55  # the allowed tokens keep their relative odds


def test_bad_words_one_token_always_multi_token_only_after_its_prefix():
    tok = WordTokenizer()
    assert bad_words_token_ids(tok, ["c", "ab"]) == [[3], [6], [1, 2], [4, 2]]
    params = SamplingParams(bad_words=["c", "ab"])
    for output, banned in (([], {3, 6}), ([1], {3, 6, 2}), ([4], {3, 6, 2}), ([5], {3, 6})):
        logits = torch.zeros(1, VOCAB)
        apply_token_constraints(logits, [seq_with(params, output)])
        assert set(torch.nonzero(logits[0].isinf()).flatten().tolist()) == banned, output
    # Only the output counts: a prompt that ends in the prefix bans nothing more.
    logits = torch.zeros(1, VOCAB)
    apply_token_constraints(logits, [seq_with(params, [], prompt=[7, 1])])
    assert not logits[0, 2].isinf()


@pytest.mark.parametrize("kwargs,needle", [
    ({"logit_bias": {"x": 1.0}}, "logit_bias key 'x'"),
    ({"logit_bias": {"5": 101}}, "logit_bias value 101"),
    ({"logit_bias": {"5": "high"}}, "logit_bias value 'high'"),
    ({"logit_bias": [1, 2]}, "logit_bias must be a dict"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"bad_words": ["ok", ""]}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"n": 3, "best_of": 2}, "best_of must be an integer >= n (3)"),
])
def test_bad_values_are_named(kwargs, needle):
    with pytest.raises(InvalidRequestError, match="invalid sampling parameter") as e:
        SamplingParams(**kwargs)
    assert needle in str(e.value)


def test_token_ids_outside_the_vocabulary_are_named():
    with pytest.raises(InvalidRequestError, match=r"logit_bias token ids \[8\]"):
        TokenConstraints.build(SamplingParams(logit_bias={8: 1.0}), None, VOCAB)
    with pytest.raises(InvalidRequestError, match=r"allowed_token_ids token ids \[9\]"):
        TokenConstraints.build(SamplingParams(allowed_token_ids=[1, 9]), None, VOCAB)
    with pytest.raises(InvalidRequestError, match="bad_words needs a tokenizer"):
        TokenConstraints.build(SamplingParams(bad_words=["x"]), None, VOCAB)


# -- on the default model ---------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Water boils at"]


@pytest.fixture(scope="module")
def llm():
    return LLM(progress=False, max_model_len=512, kv_cache_memory=64 << 20)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 10, **kw})


def test_constraints_change_only_their_own_request(llm):
    ref = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    first = ref[0].token_ids[0]
    out = llm.generate(PROMPTS, [greedy(logit_bias={first: -100}), greedy()], use_tqdm=False)
    assert out[0].token_ids[0] != first
    assert out[1].token_ids == ref[1].token_ids  # shares the batch, unchanged
    forced = llm.generate(PROMPTS[0], greedy(logit_bias={"42": 100}, ignore_eos=True), use_tqdm=False)[0]
    assert forced.token_ids == [42] * 10


def test_allowed_token_ids_and_bad_words_on_the_model(llm):
    tok = llm.get_tokenizer()
    allowed = tok.encode(" yes no maybe", add_special_tokens=False)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=allowed,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 12
    ref = llm.generate(PROMPTS[0], greedy(max_tokens=16), use_tqdm=False)[0]
    word = ref.text.split()[0]  # e.g. "Paris"
    assert word in ref.text
    out = llm.generate(PROMPTS[0], greedy(max_tokens=16, bad_words=[word]), use_tqdm=False)[0]
    banned = bad_words_token_ids(tok, [word])
    for ids in banned:
        k = len(ids)
        assert all(out.token_ids[i:i + k] != ids for i in range(len(out.token_ids))), (word, out.text)
    assert out.token_ids != ref.token_ids


def test_logit_bias_outside_the_vocabulary_names_the_prompt_and_field(llm):
    with pytest.raises(InvalidRequestError, match=r"prompt 0: .*logit_bias token ids \[1000000\]"):
        llm.generate(PROMPTS[0], greedy(logit_bias={10**6: 1.0}), use_tqdm=False)


def test_best_of_returns_the_n_most_likely_of_the_sequences_it_sampled(llm):
    kw = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    all4 = llm.generate(PROMPTS[0], SamplingParams(n=4, logprobs=0, **kw), use_tqdm=False)[0].outputs
    best = llm.generate(PROMPTS[0], SamplingParams(n=2, best_of=4, logprobs=0, **kw), use_tqdm=False)[0].outputs
    ranked = sorted(all4, key=lambda o: o.cumulative_logprob, reverse=True)
    assert len({tuple(o.token_ids) for o in all4}) > 1  # the test means something: the samples differ
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best] == [0, 1]
    assert best[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-5)
    # Without logprobs the ranking is the same; only the logprobs are left out of the output.
    plain = llm.generate(PROMPTS[0], SamplingParams(n=2, best_of=4, **kw), use_tqdm=False)[0].outputs
    assert [o.token_ids for o in plain] == [o.token_ids for o in best] and plain[0].logprobs is None
