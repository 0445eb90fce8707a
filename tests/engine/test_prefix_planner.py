"""Global prefix planning: the planner's choice is optimal (against brute force), its plan is well
formed, and planned batches give the same greedy results as unshared and online-cached ones."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.prefix_planner import plan_prefixes

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def gain_of(prompts, weights, lens) -> int:
    """sum over distinct chosen prefixes of (sharers - 1) x length."""
    sharers: dict[tuple, int] = {}
    for p, w, n in zip(prompts, weights, lens, strict=True):
        sharers[tuple(p[:n])] = sharers.get(tuple(p[:n]), 0) + w
    return sum((w - 1) * len(key) for key, w in sharers.items())


def brute_force(prompts, weights, bs) -> int:
    choices = [range(0, (len(p) - 1) // bs * bs + 1, bs) for p in prompts]
    return max(gain_of(prompts, weights, lens) for lens in itertools.product(*choices))


def random_tree_prompts(rng: random.Random, n: int, bs: int) -> list[list[int]]:
    """Prompts drawn from a small random prefix tree: a two-symbol alphabet of whole blocks, so that
    prefixes nest and overlap at every depth; the tails are ragged (partial last blocks)."""
    blocks = [[1] * bs, [2] * bs]
    prompts = []
    for _ in range(n):
        p = [t for _ in range(rng.randint(0, 4)) for t in rng.choice(blocks)]
        prompts.append(p + [rng.randint(3, 9) for _ in range(rng.randint(1, bs))])
    return prompts


@pytest.mark.parametrize("seed", range(60))
def test_planner_matches_brute_force(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3])
    prompts = random_tree_prompts(rng, rng.randint(1, 6), bs)
    weights = [rng.choice([1, 1, 1, 2, 3]) for _ in prompts]
    max_tokens = [rng.randint(1, 50) for _ in prompts]
    plan = plan_prefixes(prompts, max_tokens, bs, weights)
    assert plan.gain == brute_force(prompts, weights, bs)
    # The plan is well formed: every request once, in one group whose prefix all members share and
    # which leaves each at least one token to compute; the groups realise the claimed gain.
    assert sorted(plan.order) == list(range(len(prompts)))
    for g in plan.groups:
        assert g.prefix_len % bs == 0
        for r in g.members:
            assert g.prefix_len <= len(prompts[r]) - 1
            assert prompts[r][: g.prefix_len] == prompts[g.members[0]][: g.prefix_len]
    assert gain_of(prompts, weights, plan.prefix_lens(len(prompts))) == plan.gain


def test_plan_groups_and_order():
    sys_a, sys_b, q = random_prompts([64, 48, 200], seed=1)
    prompts = [sys_b + q[i : i + 5] for i in range(3)] + [sys_a + q[i : i + 9] for i in range(4)] + [q[:7]]
    max_tokens = [1, 1, 1, 8, 2, 9, 2, 50]
    plan = plan_prefixes(prompts, max_tokens, BS)
    groups = {g.members: g.prefix_len for g in plan.groups}
    assert groups == {(7,): 0, (5, 3, 4, 6): 64, (0, 1, 2): 48}  # decode-heavy first, in and across groups
    assert plan.gain == 3 * 64 + 2 * 48
    assert plan.order == [7, 5, 3, 4, 6, 0, 1, 2]


def test_nested_prefixes_choose_the_better_split():
    # 2 requests share 128 tokens, 3 more share only the first 32 with them: one group of 5 at 32
    # saves 4 x 32 = 128; a group of 2 at 128 plus a group of 3 at 32 saves 128 + 64 = 192.
    base, tails = random_prompts([128], seed=2)[0], random_prompts([20] * 5, seed=3)
    prompts = [base + tails[0], base + tails[1]] + [base[:32] + t for t in tails[2:]]
    plan = plan_prefixes(prompts, None, BS)
    assert plan.gain == 192
    assert sorted(plan.prefix_lens(5)) == [32, 32, 32, 128, 128]


def test_unshared_batch_is_only_reordered():
    prompts = random_prompts([30, 50, 70, 90], seed=4)
    plan = plan_prefixes(prompts, [10, 10, 10, 80], BS)
    assert plan.gain == 0 and all(g.prefix_len == 0 for g in plan.groups)
    assert plan.order[0] == 3 and sorted(plan.order) == [0, 1, 2, 3]


# -- end to end -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_prompts():
    """Nested and overlapping prefixes, duplicates, ragged tails, a prompt that is a prefix of others."""
    sys_a, sys_b, sys_c = random_prompts([40, 37, 70], seed=5)
    tails = random_prompts([3, 20, 9, 33, 17, 1, 26, 5, 12, 30], seed=6)
    nested = sys_a + sys_b  # extends sys_a
    overlap = sys_a[:20] + sys_c  # shares only part of sys_a's first blocks
    prompts = [
        sys_a + tails[0],
        nested + tails[1],
        sys_a + tails[2],
        overlap + tails[3],
        nested + tails[4],
        sys_c + tails[5],
        overlap + tails[6],
        sys_a + tails[0],
        sys_a[:33],
        nested + tails[7],
        tails[8],
        overlap + tails[9],
    ]
    random.Random(0).shuffle(prompts)
    return prompts


def assert_pool_clean(llm):
    bm = llm.engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert llm.engine.scheduler.policy.__class__.__name__ == "AdmissionPolicy"  # FCFS restored


def generate(llm, prompts, params=GREEDY):
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_pool_clean(llm)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def unshared(model_dir, shared_prompts):
    llm = LLM(str(model_dir("llama")), progress=False, enable_prefix_caching=False)
    return generate(llm, shared_prompts)


@pytest.fixture(scope="module")
def per_block(model_dir):
    import torch

    from tessera.config import ModelConfig
    from tessera.engine.model_runner import ModelRunner

    return ModelRunner.kv_bytes_per_block(ModelConfig.from_dir(model_dir("llama")), BS, torch.float32)


@pytest.mark.parametrize("planning", ["off", "auto"])
@pytest.mark.parametrize("kv_blocks", [None, 14], ids=["ample", "tight"])
def test_greedy_identical_unshared_online_planned(model_dir, shared_prompts, unshared, per_block, planning, kv_blocks):
    kv = None if kv_blocks is None else (kv_blocks + 1) * per_block
    llm = LLM(
        str(model_dir("llama")), progress=False, prefix_planning=planning, kv_cache_memory=kv, max_num_batched_tokens=64
    )
    assert llm.plans_batches == (planning == "auto")
    for _ in range(2):  # the second time round, the cache already holds prefixes
        assert generate(llm, shared_prompts) == unshared
    bm = llm.engine.block_manager
    assert bm.prefix_hits > 0
    if planning == "auto" and kv_blocks:
        assert llm.engine.scheduler.total_preemptions == 0  # admission by KV memory never overcommits
    # Every block can be handed out again.
    taken = {bm._take_free() for _ in range(bm.num_blocks)}
    assert taken == set(range(1, bm.num_blocks + 1)) and bm.num_free_blocks == 0


def test_planned_prefix_is_computed_once(model_dir):
    sys_a, *qs = random_prompts([96] + [10] * 6, seed=7)
    llm = LLM(str(model_dir("llama")), progress=False)
    outs = llm.generate([sys_a + q for q in qs], GREEDY, use_tqdm=False)
    cached = sorted(o.metrics["num_cached_tokens"] for o in outs)
    assert cached == [0] + [96] * 5  # the first member computes it, the others all find it
    assert llm.engine.stats["prompt_tokens"] == 96 + 6 * 10


def test_planning_with_n_and_order_kept(model_dir, shared_prompts, unshared):
    llm = LLM(str(model_dir("llama")), progress=False)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=1 + i % 2) for i in range(len(shared_prompts))
    ]
    got = generate(llm, shared_prompts, params)
    assert got == [u * (1 + i % 2) for i, u in enumerate(unshared)]


def test_tessera_run_plans_in_chunks(model_dir, shared_prompts, unshared, tmp_path):
    import json

    from tessera.batch_runner import run_file

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p, "id": i}) + "\n" for i, p in enumerate(shared_prompts)))
    defaults = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    for planning in ("off", "auto"):
        llm = LLM(str(model_dir("llama")), progress=False, prefix_planning=planning)
        stats = run_file(llm, inp, tmp_path / "out.jsonl", defaults, window=5, progress=False)
        recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [r["id"] for r in recs] == list(range(len(shared_prompts)))
        assert [[r["token_ids"]] for r in recs] == unshared
        assert stats["errors"] == 0 and stats["prefix_hit_rate"] > 0
        assert_pool_clean(llm)
