"""Expert parallelism on 2 and 4 gloo ranks equals the single-process HF model, and the bytes its
all-to-alls move are the moves tessera.moe.traffic predicts from the routing trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.moe.expert_parallel import run_rank
from tessera.moe.launch import run_ranks
from tessera.moe.placement import Placement, solve
from tessera.moe.trace import collect_trace
from tessera.moe.traffic import AffinityHome, attention_ranks, count_moves, kv_needed

LENGTHS = [9, 14, 5, 11, 7]  # ragged; with 4 ranks rank 0 starts with two sequences


def tiny_moe(path, top_k: int, seed: int) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=top_k, norm_topk_prob=True, tie_word_embeddings=True,
                         max_position_embeddings=128)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # decisive router logits (the init's std 0.02 leaves near-ties)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    seqs = [rng.integers(256, size=n).tolist() for n in LENGTHS]
    models = {}
    for k in (2, 1):
        path = tiny_moe(tmp_path_factory.mktemp(f"moe-k{k}"), k, seed=k)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = torch.cat([hf(input_ids=torch.tensor([s])).logits[0] for s in seqs])
        models[k] = (path, ref, collect_trace(hf, seqs))
    return seqs, models


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_matches_single_process(setup, world):
    seqs, models = setup
    jobs, expect = [], []
    for k, (path, ref, trace) in models.items():
        placements = {"round-robin": solve(trace, world, method="round-robin"),
                      "greedy": solve(trace, world, method="greedy")}
        if k == 1:
            placements = {"greedy": placements["greedy"]}
        # a placement that differs from round-robin, so that expert ids and ranks are not aligned
        assert k == 1 or not np.array_equal(placements["greedy"].rank_of, placements["round-robin"].rank_of)
        for p in placements.values():
            for scheme in ("two-a2a", "exflow"):
                jobs.append((path, p, scheme, {}))
                expect.append((k, ref, count_moves(trace, p, scheme)))
        if k == 2:  # the home picked by next-layer affinity, and K/V sent only where a later token runs
            p = placements["greedy"]
            home = AffinityHome(trace, p)
            jobs.append((path, p, "exflow", {"home": home, "kv_mode": "needed"}))
            expect.append((k, ref, count_moves(trace, p, "exflow", home)))
            kv_rows = kv_needed(trace, attention_ranks(trace, p, home), world) * trace.num_tokens * trace.num_layers
    results = run_ranks(run_rank, world, (jobs, seqs), timeout=240)
    for (_, p, scheme, opts), (k, ref, moves), got in zip(jobs, expect, results[0], strict=True):
        torch.testing.assert_close(got["logits"], ref, rtol=1e-4, atol=1e-5, msg=f"{scheme} k={k} {p.method}")
        stats = got["stats"]
        assert stats.dispatch_rows == moves.dispatch.tolist(), (scheme, k, p.method)
        assert stats.combine_rows == moves.combine.tolist(), (scheme, k, p.method)
        hidden_row = (64 + 1 + 2 * k) * 4  # [h, token index, weights, expert ids] in fp32
        assert sum(stats.dispatch_bytes) == moves.dispatch.sum() * hidden_row
        assert stats.all_to_alls == [1 if (scheme == "exflow" and k == 1) else 2] * 3
        if opts:
            kv_row = (1 + 2 * 2 * 16) * 4  # [token index, k, v] of 2 KV heads of 16, fp32
            assert sum(stats.allgather_bytes) == round(kv_rows) * kv_row
        else:
            assert (sum(stats.allgather_bytes) > 0) == (scheme == "exflow")
    kv_bytes = {(k, p.method, scheme, bool(opts)): sum(got["stats"].allgather_bytes)
                for (_, p, scheme, opts), (k, _, _), got in zip(jobs, expect, results[0], strict=True)}
    # less K/V than the all-gather (none at layer 0, where every sequence is still whole on its rank)
    assert kv_bytes[2, "greedy", "exflow", True] < kv_bytes[2, "greedy", "exflow", False]
    # every rank agrees on the totals
    assert all(r[i]["stats"].dispatch_rows == results[0][i]["stats"].dispatch_rows
               for r in results[1:] for i in range(len(jobs)))


def test_placement_of_wrong_size_is_refused(setup):
    from transformers import AutoConfig

    from tessera.errors import InvalidRequestError
    from tessera.moe.expert_parallel import check_placement

    config = AutoConfig.from_pretrained(setup[1][2][0])
    check_placement(Placement(np.zeros((3, 8), dtype=np.int64), 2), config, 2)
    with pytest.raises(InvalidRequestError, match="does not fit the model"):
        check_placement(Placement(np.zeros((2, 8), dtype=np.int64), 2), config, 2)
    with pytest.raises(InvalidRequestError, match="the group has 4"):
        check_placement(Placement(np.zeros((3, 8), dtype=np.int64), 2), config, 4)
