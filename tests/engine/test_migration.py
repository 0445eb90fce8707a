"""Moving a request between engines (tessera.engine.migration): whatever K/V it brings (all, a copy grown
row by row, none), the greedy result equals the one it would have had without moving, and the blocks go
back to both pools."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from tessera.config import EngineConfig
from tessera.engine.llm_engine import LLMEngine
from tessera.engine.migration import KVCopy, read_kv
from tessera.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir("llama")), kv_cache_memory=4 << 20, **kw), progress=False)


def run_to_end(eng: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def steps_until(eng: LLMEngine, rid: str, num_out: int) -> None:
    while len(eng.requests[rid].seqs[0].output_token_ids) < num_out:
        eng.step()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([37, 5, 70], seed=11)


@pytest.fixture(scope="module")
def pair(model_dir):
    return engine(model_dir), engine(model_dir, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def alone(pair, prompts):
    a, _ = pair
    for i, p in enumerate(prompts):
        a.add_request(p, GREEDY, request_id=f"ref{i}")
    done = run_to_end(a)
    return [done[f"ref{i}"] for i in range(len(prompts))]


def assert_pools_empty(*engines):
    for eng in engines:
        bm = eng.block_manager
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks[1:])


@pytest.mark.parametrize("with_kv", [True, False])
def test_export_then_adopt_equals_staying(pair, prompts, alone, with_kv):
    a, b = pair
    for i, p in enumerate(prompts):
        a.add_request(p, GREEDY, request_id=f"m{with_kv}{i}")
    for i in range(len(prompts)):
        rid = f"m{with_kv}{i}"
        steps_until(a, rid, 1 + 3 * i)  # right after the prefill, and later in the decode
        state = a.export_request(rid, with_kv=with_kv)
        assert state.num_kv == (len(state.token_ids) - 1 if with_kv else 0)
        a.detach_request(rid)
        b.adopt_request(state)
        if with_kv:  # adopted rows are the exported ones, so the next step starts from them
            seq = b.requests[rid].seqs[0]
            assert seq.num_computed_tokens == state.num_kv
            torch.testing.assert_close(read_kv(b.runner.kv_cache, seq.block_table, 0, state.num_kv), state.kv,
                                       rtol=0, atol=0)
    done = run_to_end(b)
    run_to_end(a)
    assert [done[f"m{with_kv}{i}"] for i in range(len(prompts))] == alone
    assert_pools_empty(a, b)


def test_kv_copy_grown_row_by_row_is_taken_over(pair, prompts, alone):
    """A partner's copy written step by step as the running side computes rows (AcceLLM) is adopted
    without copying; the first instance keeps its own copy when it hands the decode over."""
    a, b = pair
    rid = "copy"
    a.add_request(prompts[2], GREEDY, request_id=rid)
    copy, sent = KVCopy(rid), 0
    seq = a.requests[rid].seqs[0]
    while len(seq.output_token_ids) < 6:
        a.step()
        rows = read_kv(a.runner.kv_cache, seq.block_table, sent, seq.num_computed_tokens)
        assert copy.extend(b.block_manager, b.runner.kv_cache, list(seq.token_ids), sent, rows)
        sent = seq.num_computed_tokens
    state = a.export_request(rid, with_kv=False)
    kept = a.detach_request(rid, keep_kv=True)
    assert kept.num_rows == sent and a.block_manager.num_used_blocks == len(kept.block_table)
    b.adopt_request(state, copy)
    assert copy.block_table == [] and b.requests[rid].seqs[0].num_computed_tokens == sent
    done = run_to_end(b)
    assert done[rid] == alone[2]
    kept.release(a.block_manager)
    assert_pools_empty(a, b)


def test_rows_that_do_not_follow_are_refused(pair):
    a, b = pair
    copy = KVCopy("x")
    rows = torch.zeros(2, 2, 3, 2, 16)
    with pytest.raises(ValueError, match="do not follow"):
        copy.extend(b.block_manager, b.runner.kv_cache, [1, 2, 3, 4, 5], 2, rows)
    assert copy.block_table == []


def test_kv_copy_grown_layer_by_layer(pair, prompts, alone):
    """Rows sent one layer (or a group of layers) at a time count as held only once the last layer's are in."""
    a, b = pair
    rid = "layers"
    a.add_request(prompts[2], GREEDY, request_id=rid)
    seq = a.requests[rid].seqs[0]
    copy, sent = KVCopy(rid), 0
    assert a.runner.kv_cache.shape[0] >= 2  # a group of layers after the first
    while seq.num_computed_tokens < seq.num_prompt_tokens:  # the prompt, a chunk a step
        a.step()
        rows = read_kv(a.runner.kv_cache, seq.block_table, sent, seq.num_computed_tokens)
        # layer 0 alone ([2, n, heads, dim]), then the layers from 1 on in one message ([L - 1, 2, n, ...])
        for layer, part in ((0, rows[0]), (1, rows[1:])):
            assert copy.num_rows == sent
            assert copy.extend_layer(b.block_manager, b.runner.kv_cache, list(seq.token_ids), layer, sent, part)
        sent = seq.num_computed_tokens
        assert copy.num_rows == sent
    with pytest.raises(ValueError, match="do not follow"):
        copy.extend_layer(b.block_manager, b.runner.kv_cache, list(seq.token_ids), 0, sent + 1, rows[0])
    state = a.export_request(rid, with_kv=False)
    a.detach_request(rid)
    b.adopt_request(state, copy)
    assert b.requests[rid].seqs[0].num_computed_tokens == sent
    assert run_to_end(b)[rid] == alone[2]
    assert_pools_empty(a, b)
