"""Expert parallelism in the engine (tessera/distributed/expert_parallel.py): 2 gloo ranks spawned by the
engine, experts placed by a placement file, give the single-process engine's greedy tokens and logits
(fp32); a bad placement file fails at load with a clear error, before any worker starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_greedy, prompt_logits, random_prompts

from tessera import LLM, SamplingParams
from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.moe.placement import Placement

PROMPTS = random_prompts([9, 4, 15], vocab=512, seed=5)


def _engine(path, **kw) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_num_seqs=4, progress=False,
               num_threads=1, distributed_timeout_s=60, max_num_batched_tokens=16, **kw)


def _run(llm: LLM):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    return llm.generate(PROMPTS, params, use_tqdm=False), prompt_logits(llm, PROMPTS[0])


def _placement_file(tmp_path, rank_of, num_ranks: int = 2, **extra) -> str:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"num_ranks": num_ranks, "rank_of": rank_of, **extra}))
    return str(path)


def test_expert_parallel_equals_single_process(model_dir, tmp_path):
    """qwen3_moe: 2 layers of 8 experts, top-2; a placement unlike round-robin (and unlike each other
    per layer); prompts longer than the 16-token step budget, so prefill is chunked."""
    path = model_dir("qwen3_moe")
    ref = _engine(path)
    try:
        want, want_logits = _run(ref)
    finally:
        ref.close()
    rank_of = [[1, 1, 0, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0, 1, 0]]
    llm = _engine(path, expert_parallel_size=2, moe_placement=_placement_file(tmp_path, rank_of))
    try:
        blocks = llm.engine.model.moe_blocks()
        assert [b.experts.num_experts for b in blocks] == [4, 4]  # rank 0 keeps its 4 experts only
        # rank 0's local expert 0 of layer 0 is global expert 2 (the first on rank 0)
        torch.testing.assert_close(blocks[0].experts.w_down[0], ref.engine.model.moe_blocks()[0].experts.w_down[2])
        got, got_logits = _run(llm)
        stats = blocks[0].executor.stats
    finally:
        llm.close()
    assert_same_greedy(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
    assert all(b > 0 for b in stats.reduce_bytes)  # both layers summed their partial outputs over the ranks


@pytest.mark.slow  # two more engines (~15 s)
def test_expert_parallel_round_robin_shared_expert_and_dense_layer(model_dir):
    """qwen2_moe: top-3, a shared expert and a dense layer (layer 1), no placement file: round-robin."""
    path = model_dir("qwen2_moe")
    ref = _engine(path)
    try:
        want, want_logits = _run(ref)
    finally:
        ref.close()
    llm = _engine(path, expert_parallel_size=2)
    try:
        assert len(llm.engine.model.moe_blocks()) == 2
        got, got_logits = _run(llm)
    finally:
        llm.close()
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)


RR = [[0, 1] * 4, [0, 1] * 4]


@pytest.mark.parametrize("rank_of, extra, error, match", [
    ([[0, 1] * 4], {}, InvalidRequestError, "covers 1 MoE layers x 8 experts; .* has 2 x 8"),
    ([[0, 1] * 3, [0, 1] * 3], {}, InvalidRequestError, "covers 2 MoE layers x 6 experts"),
    ([[0, 1] * 4, [0, 1, 0, 1, 0, 1, 0]], {}, InvalidRequestError, "layer 1 places 7 experts, not 8"),
    ([[0, 0, 0, 0, 0, 1, 1, 1], [0, 1] * 4], {}, InvalidRequestError,
     "puts 5 experts of MoE layer 0 on rank 0, over its capacity of 4"),
    ([[0, 0, 0, 0, 0, 1, 1, 1], [0, 1] * 4], {"capacity": 5}, None, None),  # the file's own capacity
    ([[0, 1] * 4, [0, 2] * 4], {}, InvalidRequestError, r"ranks must lie in \[0, 2\)"),
    (RR, {"num_ranks": 4}, InvalidRequestError, "placement is for 4 ranks; the engine runs 2"),
    ([[0, 1] * 4, [0, "1"] * 4], {}, InvalidRequestError, "not an integer"),
])
def test_bad_placement_fails_at_load(model_dir, tmp_path, rank_of, extra, error, match):
    from tessera.config import EngineConfig, ModelConfig
    from tessera.distributed.expert_parallel import engine_placement

    path = model_dir("qwen3_moe")
    kw = {"num_ranks": 2, **extra}
    placement = _placement_file(tmp_path, rank_of, **kw)
    config = EngineConfig(model=str(path), expert_parallel_size=2, moe_placement=placement)
    if error is None:
        assert engine_placement(config, ModelConfig.from_dir(path)).max_load() == 5
        return
    with pytest.raises(error, match=match):
        _engine(path, expert_parallel_size=2, moe_placement=placement)  # raised before any worker starts


def test_placement_file_unreadable_or_for_another_model(model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read the expert placement"):
        _engine(model_dir("qwen3_moe"), expert_parallel_size=2, moe_placement=str(tmp_path / "missing.json"))
    with pytest.raises(InvalidRequestError, match="needs a mixture-of-experts model"):
        _engine(model_dir("llama"), expert_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="more than the model's 8 experts"):
        _engine(model_dir("qwen3_moe"), expert_parallel_size=16)


def test_saved_placement_round_trips_with_its_capacity(tmp_path):
    p = Placement(np.array([[0, 0, 0, 1], [1, 1, 0, 0]]), 2, method="greedy", capacity=3)
    p.save(tmp_path / "p.json")
    q = Placement.load(tmp_path / "p.json")
    assert q.capacity == 3 and q.method == "greedy" and (q.rank_of == p.rank_of).all()
    q.check_fits(2, 4, 2)
    with pytest.raises(InvalidRequestError, match="over its capacity of 2"):
        Placement(p.rank_of, 2).check_fits(2, 4, 2)
