"""The all-to-all expert executor in part A's seam (SparseMoeBlock.executor) on 2 and 4 gloo ranks: every
rank's rows get the same expert output as the local executor gives them, including a rank with no rows."""

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
