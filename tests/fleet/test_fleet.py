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


async def holder_of(router, request_id: str) -> int:
    """The one live instance running request_id (its engine holds it), asked of the instances themselves."""
    held = [i for i, h in enumerate(router.handles)
            if router.live[i] and (await h.call("kv_of", request_id))["running"] is not None]
    assert len(held) == 1, f"{request_id} runs on {held}"
    return held[0]


async def run_fleet(config: EngineConfig, fleet: FleetConfig, prompts, kill_at: int | None = None,
                    inspect=None):
    """Submit every prompt at once and stream them all. With kill_at, every instance is told to stop
    stepping once the first request has that many tokens (EngineInstance.hold_at), so the instance
    running it is frozen right there whatever the machine's speed; when the stream shows those tokens,
    `inspect(router, holder)` may look at the instances, the holder is killed and the others released.
    Returns (final outputs by index, how many final outputs each request got, the router, the killed one)."""
    router = await start_router(config, fleet, keep_records=True)
    router.start()
    queue: asyncio.Queue = asyncio.Queue()
    try:
        if kill_at is not None:
            for h in router.handles:
                await h.call("hold_at", "r0", kill_at)
        for i, p in enumerate(prompts):
            await router.add(f"r{i}", None, p, params_of(i), queue, tag=i, stream=True)
        finals, counts, streamed = {}, [0] * len(prompts), [[] for _ in prompts]
        killed = None
        while len(finals) < len(prompts):
            tag, out = await asyncio.wait_for(queue.get(), 120)
            toks = out.outputs[0].token_ids if out.outputs else []
            assert toks[:len(streamed[tag])] == streamed[tag], f"a stream went back on tokens it had shown: {out}"
            streamed[tag] = list(toks)
            if kill_at is not None and killed is None and tag == 0 and len(toks) >= kill_at:
                assert not out.finished and len(toks) == kill_at, "the instance running r0 did not hold"
                killed = await holder_of(router, "r0")
                if inspect is not None:
                    await inspect(router, killed)
                router.handles[killed].kill()
                for i, h in enumerate(router.handles):  # the one taking r0 over would hold at its next token
                    if i != killed:
                        await h.call("release")
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
        router.final_records = await router.instance_records(1)
        return [finals[i] for i in range(len(prompts))], counts, router, killed
    finally:
        router.stop()
        stop_instances(router.handles)


async def kv_where_r0_runs(router, holder: int, prompt_len: int, want_copy: bool) -> dict:
    """The K/V rows of r0 on the instance running it, and on its partner (the other of two) as a redundant
    copy. The copy's last rows may still be on their way (sent after the holder's last step, on another
    channel than this call): with want_copy, wait for it to cover the prompt (bounded)."""
    seen = {"decoder": await router.handles[holder].call("kv_of", "r0")}
    deadline = time.monotonic() + 30
    while True:
        seen["partner"] = await router.handles[1 - holder].call("kv_of", "r0")
        if not want_copy or (seen["partner"]["copy"] or 0) >= prompt_len or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_once_with_one_engines_output(model_dir, prompts, alone, policy):
    fleet = FleetConfig(instances=2, backend="local", routing=policy)
    finals, counts, router, _ = asyncio.run(run_fleet(engine_config(model_dir), fleet, prompts))
    assert counts == [1] * len(prompts)
    assert [f.outputs[0].token_ids for f in finals] == alone
    assert all(f.outputs[0].finish_reason == "length" and not f.error for f in finals)
    # every step timed with its shape (the simulator's cost fit), the prompt tokens each instance computed
    steps = router.final_records
    assert [len(r.step_samples) for r in steps] == [s.steps for s in router.snaps]
    assert all(row[4] > 0 for r in steps for row in r.step_samples)
    assert [sum(row[0] for row in r.step_samples) for r in steps] == [s.prompt_tokens for s in router.snaps]
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


@pytest.mark.parametrize("policy", ["least-loaded", "pd-split", "accellm"])
def test_killed_instance_loses_no_request(model_dir, prompts, alone, policy):
    """The instance decoding r0 is killed at r0's 4th token (held there by the hold_at hook): no request is
    lost or repeated, outputs equal a single engine's; r0's K/V was on its decoder and, with accellm, a
    whole copy on the partner."""
    fleet = FleetConfig(instances=2, backend="local", routing=policy)
    seen = {}

    async def inspect(router, holder):
        seen.update(await kv_where_r0_runs(router, holder, len(prompts[0]), policy == "accellm"))

    finals, counts, router, killed = asyncio.run(run_fleet(engine_config(model_dir), fleet, prompts, kill_at=4,
                                                           inspect=inspect))
    assert killed is not None and router.deaths == [killed]
    assert counts == [1] * len(prompts)
    assert [f.outputs[0].token_ids for f in finals] == alone
    assert seen["decoder"]["running"] >= len(prompts[0]) + 3, seen  # its K/V where it decodes
    if policy == "accellm":  # the partner held a whole copy of it (and finished it from there)
        assert seen["partner"]["copy"] >= len(prompts[0]), seen


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
