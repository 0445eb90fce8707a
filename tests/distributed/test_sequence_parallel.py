"""Sequence-parallel prefill through the engine (2 gloo ranks): the same greedy output as one process."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams

PROMPTS = random_prompts([37, 50, 3, 21], vocab=512, seed=5)  # 3 tokens: too short to split, runs on rank 0


def _engine(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_num_seqs=4, progress=False,
               num_threads=1, distributed_timeout_s=60, **kw)


@pytest.mark.parametrize("mode", [pytest.param("ring", marks=pytest.mark.slow), "tokenring"])
def test_sequence_parallel_prefill_equals_single_process(model_dir, mode):
    path = model_dir("qwen3")  # q/k norms, 4 KV heads
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    ref = _engine(path)
    want = ref.generate(PROMPTS, params, use_tqdm=False)
    ref.close()
    llm = _engine(path, sequence_parallel_size=2, sequence_parallel_mode=mode)
    try:
        runner = llm.engine.runner
        splits = []
        original = runner._prefill
        runner._prefill = lambda item: splits.append(item.num_new_tokens) or original(item)
        got = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.close()
    assert sorted(splits) == [21, 37, 50]  # the three long prompts went through the ranks
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        # the first from the split prefill, the others decoded on rank 0 over the K/V gathered from the ranks
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            for t in lw:
                assert abs(lg[t].logprob - lw[t].logprob) < 1e-5
