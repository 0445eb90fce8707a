"""The all-to-all expert executor in part A's seam (SparseMoeBlock.executor) on 2 and 4 gloo ranks: every
rank's rows get the same expert output as the local executor gives them, including a rank with no rows;
and the whole engine with its experts over two ranks generates the single-process tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.moe.launch import run_ranks
from tessera.moe.placement import Placement

ROWS = [6, 0, 9, 4]  # rows per rank; rank 1 has none but must still join every collective


def executor_rank(rank: int, world: int, model_dir: str, placement: Placement) -> dict:
    from tessera.config import ModelConfig
    from tessera.models.loader import load_model
    from tessera.models.moe import route
    from tessera.models.moe_executor import LOCAL_EXECUTOR
    from tessera.moe.executor import AllToAllExpertExecutor
    from tessera.ops.backend import TorchBackend

    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(Path(model_dir), cfg, 64, torch.device("cpu"), torch.float32, progress=False)
    blocks = model.moe_blocks()
    executor = AllToAllExpertExecutor(placement, [b.layer_idx for b in blocks])
    ops = TorchBackend(torch.device("cpu"))
    torch.manual_seed(100 + rank)
    x = torch.randn(ROWS[rank], cfg.hidden_size)
    diffs, scale = [], 1.0
    for block in blocks:
        routing = route(block.gate(x), block.moe, block.keep_fp32_weights)
        got = executor(block, x, routing, ops)
        if x.shape[0] == 0:  # (the local executor's combine cannot take zero rows)
            assert got.shape == x.shape
            diffs.append(0.0)
            continue
        want = LOCAL_EXECUTOR(block, x, routing, ops)
        diffs.append(float((got - want).abs().max()))
        scale = float(want.abs().max())
    return {"diffs": diffs, "scale": scale, "stats": executor.stats.summed()}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_all_to_all_executor_matches_local(model_dir, world):
    path = str(model_dir("qwen2_moe"))  # layers 0 and 2 sparse (8 experts, top-3, shared expert), 1 dense
    rng = np.random.default_rng(world)
    rank_of = np.stack([rng.permutation(np.arange(8) % world) for _ in range(2)])
    results = run_ranks(executor_rank, world, (path, Placement(rank_of, world)), timeout=240)
    for r in results:
        assert max(r["diffs"]) <= 1e-5 * max(r["scale"], 1.0), r["diffs"]
    stats = results[0]["stats"]
    assert stats.all_to_alls == [2, 2]
    assert all(d > 0 for d in stats.dispatch_rows) and stats.dispatch_rows == stats.combine_rows


def engine_rank(rank: int, world: int, model_dir: str, placement: Placement, prompts: list[list[int]]) -> dict:
    """The whole engine on every rank (same requests, so every rank steps in lockstep and calls each MoE
    block together), its experts spread over the ranks through the executor seam."""
    from tessera import LLM, SamplingParams
    from tessera.models.moe_executor import set_expert_executor
    from tessera.moe.executor import AllToAllExpertExecutor

    llm = LLM(model_dir, dtype="float32", kv_cache_memory=64 << 20, num_threads=1, progress=False)
    blocks = llm.engine.model.moe_blocks()
    executor = AllToAllExpertExecutor(placement, [b.layer_idx for b in blocks])
    assert set_expert_executor(llm.engine.model, executor) == len(blocks)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return {"tokens": [o.token_ids for o in outs], "stats": executor.stats.summed()}


@pytest.mark.slow
def test_engine_with_experts_over_two_ranks_generates_the_same_tokens(model_dir):
    from tessera import LLM, SamplingParams

    path = str(model_dir("qwen3_moe"))
    prompts = [[5, 9, 17, 33, 2], [101, 7, 7, 64, 250, 11, 3], [42]]
    single = LLM(path, dtype="float32", kv_cache_memory=64 << 20, progress=False)
    want = [o.token_ids for o in single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6,
                                                                          ignore_eos=True), use_tqdm=False)]
    num_layers = len(single.engine.model.moe_blocks())
    rank_of = np.stack([np.random.default_rng(i).permutation(np.arange(8) % 2) for i in range(num_layers)])
    results = run_ranks(engine_rank, 2, (path, Placement(rank_of, 2), prompts), timeout=300)
    for r in results:
        assert r["tokens"] == want
    assert all(rows > 0 for rows in results[0]["stats"].dispatch_rows)
