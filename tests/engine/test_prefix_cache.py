"""The online prefix cache: eviction never takes a block in use, LRU order, hash collisions cannot
splice in a wrong prefix, hit-rate bookkeeping once per admission."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.engine import block_manager as bm_mod
from tessera.engine.block_manager import BlockManager
from tessera.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def seq_of(tokens, sid=0) -> Sequence:
    s = Sequence(sid, f"r{sid}", 0, list(tokens), GREEDY)
    s.max_total_tokens = len(tokens) + 10
    return s


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq and pretend its whole prompt was computed."""
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_eviction_never_takes_a_block_in_use():
    bm = BlockManager(num_blocks=9, block_size=4)  # 8 usable
    a = seq_of(range(100, 113))  # 13 tokens: 3 full blocks + 1 partial
    compute(bm, a)
    b = seq_of(range(200, 208), 1)  # 2 full blocks, cached after b finishes
    compute(bm, b)
    bm.free_seq(b)
    c = seq_of(list(range(100, 108)) + [7, 7, 7], 2)  # shares a's first 2 blocks
    compute(bm, c)
    assert c.num_cached_prompt_tokens == 8 and bm.blocks[a.block_table[0]].ref_count == 2
    in_use = set(a.block_table) | set(c.block_table)
    assert bm.num_free_blocks == 8 - len(in_use)
    # Drain the pool: only free blocks (never-used ones first, then b's cached ones) are handed out.
    taken = [bm._take_free() for _ in range(bm.num_free_blocks)]
    assert not set(taken) & in_use
    assert not bm.can_allocate(seq_of(range(300, 305), 3), 5)
    # a's blocks kept their contents and are still found.
    d = seq_of(list(range(100, 112)) + [1], 4)
    assert bm.match_prefix(d) == 12 and d.block_table == a.block_table[:3]
    for s in (a, c, d):
        bm.free_seq(s)
    for bid in taken:
        bm.blocks[bid].ref_count -= 1
        bm.free[bid] = None
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_lru_takes_leaves_and_oldest_first():
    bm = BlockManager(num_blocks=9, block_size=2)  # 8 usable
    a, b = seq_of([1, 2, 3, 4, 5]), seq_of([6, 7, 8, 9, 10], 1)
    compute(bm, a)
    compute(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free_seq(a)
    bm.free_seq(b)
    # The 2 never-used blocks first, then a's (freed first), each chain leaf before its root.
    order = [bm._take_free() for _ in range(8)]
    assert order[2:] == a_blocks[::-1] + b_blocks[::-1]


def test_hash_collisions_are_caught(monkeypatch):
    # Every block collides with every other: only token comparison tells them apart.
    monkeypatch.setattr(bm_mod, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=9, block_size=2)
    compute(bm, seq_of([1, 2, 3, 4, 5]))
    assert bm.match_prefix(seq_of([1, 2, 9, 9, 9], 1)) == 2  # right first block, then a mismatch
    assert bm.match_prefix(seq_of([3, 4, 1, 2, 9], 2)) == 0  # same blocks, other positions
    # A hash blind to the parent: equal tokens at another position collide; the parent check holds.
    monkeypatch.setattr(bm_mod, "chain_hash", lambda parent, tokens: hash(tuple(tokens)))
    bm = BlockManager(num_blocks=9, block_size=2)
    compute(bm, seq_of([1, 2, 3, 4, 5]))
    assert bm.match_prefix(seq_of([1, 2, 3, 4, 9], 1)) == 4
    assert bm.match_prefix(seq_of([3, 4, 3, 4, 9], 2)) == 0
    assert bm.match_prefix(seq_of([1, 2, 1, 2, 9], 3)) == 2


@pytest.mark.parametrize("planning", ["off", "auto"])
def test_constant_hash_keeps_results(model_dir, monkeypatch, planning):
    sys_a, *tails = random_prompts([50, 5, 17, 30, 8], seed=11)
    prompts = [sys_a + t for t in tails] + tails + [sys_a[:40] + tails[0]]
    ref = [
        o.token_ids
        for o in LLM(str(model_dir("llama")), progress=False, enable_prefix_caching=False).generate(
            prompts, GREEDY, use_tqdm=False
        )
    ]
    monkeypatch.setattr(bm_mod, "chain_hash", lambda parent, tokens: 0)
    llm = LLM(str(model_dir("llama")), progress=False, prefix_planning=planning, block_size=4)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
    assert llm.engine.block_manager.num_used_blocks == 0


def test_hit_rate_counted_once_per_admission(model_dir):
    from tessera.engine.model_runner import ModelRunner

    probe = LLM(str(model_dir("llama")), progress=False)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model_config, 16, probe.engine.dtype)
    # 6 blocks: the second request waits (and is looked up every step) until the first finishes.
    llm = LLM(str(model_dir("llama")), progress=False, kv_cache_memory=7 * per_block, prefix_planning="off")
    eng = llm.engine
    p = random_prompts([60], seed=12)[0]
    eng.add_request(p, GREEDY)
    eng.add_request(p[:16] + [5] * 60, GREEDY)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    bm = eng.block_manager
    assert steps > 12 and eng.scheduler.total_preemptions == 0
    assert bm.prefix_queries == 60 + 76 and bm.prefix_hits == 16
