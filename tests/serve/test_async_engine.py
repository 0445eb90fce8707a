"""The engine thread's bridge: admission against the bounded waiting queue must never see a request in
neither place (handed to the engine but not yet in a published snapshot)."""

from __future__ import annotations

import asyncio

import pytest

from tessera import LLM, SamplingParams
from tessera.serve.async_engine import AsyncEngine, QueueFullError


def test_waiting_count_has_no_gap_between_hand_over_and_snapshot(model_dir):
    llm = LLM(str(model_dir("llama")), progress=False, max_num_seqs=1, kv_cache_memory=32 << 20)
    engine = AsyncEngine(llm.engine, max_waiting=1)
    engine.start()

    async def scenario() -> int:
        queue: asyncio.Queue = asyncio.Queue()
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        await engine.add("a", None, [1, 2, 3, 4], long, queue)  # takes the only seat
        while engine.snapshot.running < 1:
            await asyncio.sleep(0.001)
        await engine.add("b", None, [5, 6, 7], long, queue)  # takes the only waiting place
        refusals = 0
        # While A decodes, B sits in the waiting queue: every admission check in between must refuse,
        # including those that land between the engine taking B and its next snapshot.
        for _ in range(2000):
            with pytest.raises(QueueFullError):
                engine.check_capacity()
            refusals += 1
            await asyncio.sleep(0)
        engine.abort("a")
        engine.abort("b")
        return refusals

    try:
        assert asyncio.run(scenario()) == 2000
    finally:
        engine.stop()
    assert llm.engine.block_manager.num_used_blocks == 0
