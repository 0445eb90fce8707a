"""Batch composition, chunked prefill, preemption and prefix caching never change a greedy result;
blocks always return to the pool; the scheduler keeps its budgets."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.engine.online_admission import ShortestPromptFirst
from tessera.engine.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
LENGTHS = [3, 20, 47, 64, 90, 150, 5, 33]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=3)


@pytest.fixture(scope="module")
def alone(model_dir, prompts):
    llm = LLM(str(model_dir("llama")), progress=False, enable_prefix_caching=False)
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]


def run(model_dir, prompts, **kw):
    llm = LLM(str(model_dir("llama")), progress=False, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    bm = llm.engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    return llm, [o.token_ids for o in outs]


def arriving_beside_decodes(eng, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens when they arrive two at a time every third step, beside the running
    decodes (as on a server)."""
    pending = list(enumerate(prompts))
    got: dict[str, list[int]] = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        if pending and step % 3 == 0:
            for k, p in pending[:2]:
                eng.add_request(p, GREEDY, request_id=str(k))
            del pending[:2]
        for out in eng.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        step += 1
    return [got[str(k)] for k in range(len(prompts))]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=32),  # every long prompt is prefilled in chunks
    dict(max_num_batched_tokens=7, block_size=4),  # chunks smaller than a block
    dict(max_num_seqs=3),
], ids=["batched", "no-prefix-cache", "chunked", "tiny-chunks", "seq-cap"])
def test_greedy_identical_alone_and_batched(model_dir, prompts, alone, kw):
    _, got = run(model_dir, prompts, **kw)
    assert got == alone


def test_preemption_keeps_results(model_dir, prompts, alone):
    # Room for ~25 blocks of 16 tokens: the batch cannot all fit, so sequences get preempted.
    from tessera.engine.model_runner import ModelRunner

    llm0 = LLM(str(model_dir("llama")), progress=False)
    per_block = ModelRunner.kv_bytes_per_block(llm0.engine.model_config, 16, llm0.engine.dtype)
    for caching in (True, False):
        llm, got = run(model_dir, prompts, kv_cache_memory=26 * per_block, enable_prefix_caching=caching,
                       prefix_planning="off")  # planned batches are admitted by KV memory: no preemption
        assert llm.engine.scheduler.total_preemptions > 0
        assert got == alone


def test_prefix_cache_hit_keeps_results(model_dir, prompts, alone):
    llm = LLM(str(model_dir("llama")), progress=False)
    first = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    second = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]  # served from the cache
    assert llm.engine.block_manager.prefix_hits > 0
    assert first == alone and second == alone


def test_budgets_never_exceeded(model_dir, prompts, monkeypatch):
    seen = []
    orig = Scheduler.schedule

    def spy(self):
        out = orig(self)
        seen.append((out.num_tokens, len(out.scheduled), len(self.running)))
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    run(model_dir, prompts * 3, max_num_batched_tokens=64, max_num_seqs=5)
    assert seen
    assert max(t for t, _, _ in seen) <= 64
    assert max(n for _, n, _ in seen) <= 5 and max(r for _, _, r in seen) <= 5
    # The batch stays dense: once full, every step runs the cap until the queue drains.
    assert sum(1 for _, n, _ in seen if n == 5) > len(seen) // 2


def test_finished_request_frees_blocks_at_once(model_dir):
    llm = LLM(str(model_dir("llama")), progress=False)
    eng = llm.engine
    eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), request_id="a")
    eng.add_request([5, 6, 8] * 20, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), request_id="b")
    done = []
    while eng.has_unfinished_requests():
        outs = eng.step()
        done += [o.request_id for o in outs if o.finished]
        if done == ["a"]:
            # a's blocks are back; b still holds its own
            b = eng.scheduler.running[0]
            assert eng.block_manager.num_used_blocks == len(b.block_table)
    assert done == ["a", "b"]


@pytest.mark.parametrize("shortest_first", [False, True], ids=["fcfs", "shortest-first"])
def test_mixed_prefill_cap_keeps_results_and_bounds_steps(model_dir, prompts, alone, monkeypatch, shortest_first):
    """Prompts arriving while others decode (as on a server): with mixed_prefill_tokens a step that
    carries decodes computes at most that many prompt tokens, so prompts are split across steps at
    points chosen by the load, and (a server's policy) the shortest waiting prompt may go first; the
    greedy tokens stay those of each prompt run alone."""
    cap = 24
    seen = []
    orig = Scheduler.schedule

    def spy(self):
        out = orig(self)
        decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        seen.append((decodes, sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1)))
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    llm = LLM(str(model_dir("llama")), progress=False, mixed_prefill_tokens=cap, enable_prefix_caching=False,
              max_num_batched_tokens=128)
    # All at once: the first step has no decodes and takes the whole step budget.
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == alone
    assert seen[0] == (0, 128)
    seen.clear()
    eng = llm.engine
    if shortest_first:
        eng.scheduler.policy = ShortestPromptFirst()
    assert arriving_beside_decodes(eng, prompts) == alone
    mixed = [pre for dec, pre in seen if dec]
    assert max(mixed) <= cap  # the cap holds in every step that carries decodes
    assert sum(1 for pre in mixed if pre == cap) >= 3  # long prompts really were split by it
    bm = eng.block_manager
    assert bm.num_used_blocks == 0



@pytest.mark.parametrize("cap", [None, 8], ids=["no-cap", "mixed-cap"])
def test_prefill_first_steps_carry_no_decodes_and_keep_results(model_dir, prompts, alone, monkeypatch, cap):
    """prefill_first: while a prompt has tokens to compute (waiting, or a chunk left), a step computes only
    prompt tokens and the running decodes take the next step, alone, so they never wait two steps; once
    nothing is left to prefill the decodes go on. Prompts arriving beside running decodes (as on a server)
    keep their greedy tokens. A mixed_prefill_tokens cap does not bind those prompt-only steps: they carry
    no decodes."""
    seen = []
    orig = Scheduler.schedule

    def spy(self):
        prompt_work = bool(self.waiting) or any(s.num_tokens_to_schedule > 1 for s in self.running)
        running_decodes = sum(1 for s in self.running if s.num_tokens_to_schedule == 1)
        out = orig(self)
        decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1 and s.seq.num_computed_tokens
                      >= s.seq.num_prompt_tokens)
        prefill = sum(s.num_new_tokens for s in out.scheduled if s.seq.num_computed_tokens < s.seq.num_prompt_tokens)
        seen.append((prompt_work, decodes, prefill, running_decodes))
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    llm = LLM(str(model_dir("llama")), progress=False, prefill_first=True, enable_prefix_caching=False,
              max_num_batched_tokens=64, mixed_prefill_tokens=cap)
    eng = llm.engine
    assert arriving_beside_decodes(eng, prompts) == alone
    if cap is not None:
        assert max(pre for _, dec, pre, run in seen if run and not dec) > cap
    assert all(dec == 0 for work, dec, pre, _ in seen if pre)  # no step mixes a prefill with decodes
    assert sum(1 for work, dec, pre, run in seen if pre and run) >= len(prompts) // 2  # prompts came mid-run
    assert sum(1 for work, dec, pre, _ in seen if not pre and dec) > 20  # the decodes ran in their own steps
    # Decodes wait at most one prefill step: after a step that left running decodes out, the next is theirs.
    for (_, _, pre0, run0), (_, dec1, pre1, _) in zip(seen, seen[1:], strict=False):
        if pre0 and run0:
            assert dec1 and not pre1
    assert eng.block_manager.num_used_blocks == 0

def test_shortest_prompt_first_overtakes_and_ages(model_dir):
    """With the prefill budget spent, waiting prompts go shortest first; one that keeps losing gains
    aging_tokens a step until it goes first, so none waits forever; preempted ones go first."""
    llm = LLM(str(model_dir("llama")), progress=False, mixed_prefill_tokens=8, enable_prefix_caching=False)
    eng = llm.engine
    eng.scheduler.policy = ShortestPromptFirst(aging_tokens=16)
    eng.add_request([7] * 5, GREEDY, request_id="running")
    eng.step()  # now it decodes, so every later step carries at most 8 prompt tokens
    eng.add_request([9] * 60, GREEDY, request_id="long")
    eng.add_request([8] * 6, GREEDY, request_id="short")
    plan = eng.scheduler.schedule()
    # The short one overtook; the long one gets what is left of the budget.
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("running", 1), ("short", 6), ("long", 2)]
    short, long = eng.scheduler.running[1:]
    policy = ShortestPromptFirst(aging_tokens=16)
    policy.step = 10
    policy.first_seen[long] = 6  # waited 4 steps: counts as 60 - 4 * 16 = -4 tokens, ahead of a fresh 6
    assert policy._key(long) < policy._key(short)
    short.num_preemptions = 1
    assert policy._key(short) < policy._key(long)


def test_shortest_prompt_first_ages_by_steps_not_by_passes():
    """A prefill_first step whose prompt-only pass admits nothing (the pool is too small for the waiting
    prompt) is planned again in full, so the policy's start_step runs twice in that step; a waiting
    prompt must still age one step per step."""
    from tessera.engine.block_manager import BlockManager
    from tessera.engine.sequence import Sequence

    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)  # 3 usable blocks
    policy = ShortestPromptFirst()
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, policy=policy, prefill_first=True)
    sched.add(Sequence(0, "running", 0, [1, 2, 3], GREEDY))
    assert [s.num_new_tokens for s in sched.schedule().scheduled] == [3]
    sched.running[0].num_computed_tokens = 3
    sched.running[0].token_ids.append(4)
    sched.add(Sequence(1, "too-long", 0, list(range(5, 15)), GREEDY))  # 10 tokens: 3 blocks, 2 are free
    for step in range(2, 5):
        plan = sched.schedule()
        assert [s.seq.request_id for s in plan.scheduled] == ["running"]  # the decode, from the second pass
        assert policy.step == sched.num_steps == step
        sched.running[0].num_computed_tokens += 1
        sched.running[0].token_ids.append(step)
