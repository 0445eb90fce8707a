"""The fleet simulator: deterministic, every request completes exactly once under every policy (with an
instance killed too), each policy's mechanics visible in the records, and a single FIFO server checked
against queueing theory."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from tessera.errors import InvalidRequestError
from tessera.fleet.cost_model import LinearCost
from tessera.fleet.policies import POLICIES
from tessera.fleet.sim import FleetSim, SimConfig, simulate
from tessera.fleet.trace import TraceRequest, TraceSpec, load_trace, prompt_token_ids

COST = LinearCost(kv_bytes_per_token=4096, num_layers=4, base=0.01, per_prefill_token=1e-4, per_decode_seq=1e-3,
                  per_decode_context=1e-6, link_bandwidth=1e9)
SPEC = TraceSpec("conv", num_requests=120, request_rate=4.0, max_prompt_tokens=256, max_output_tokens=24,
                 vocab_size=4096, shared_prefix_tokens=64, shared_prefix_fraction=0.5)


@pytest.fixture(scope="module")
def workload():
    trace = load_trace(SPEC)
    return trace, [prompt_token_ids(r, SPEC) for r in trace]


def _check_exactly_once(result, trace):
    assert len(result.requests) == len(trace)
    by_id = {r.request_id: r for r in result.requests}
    for tr in trace:
        rec = by_id[tr.request_id]
        assert rec.completions == 1, tr.request_id
        assert rec.output_tokens == tr.output_tokens  # every token once: none lost, none repeated
        assert rec.finish == rec.token_times[-1] and rec.token_times[0] > rec.arrival
        assert all(b > a for a, b in zip(rec.token_times, rec.token_times[1:], strict=False))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_request_completes_exactly_once(policy, workload):
    trace, prompts = workload
    res = simulate(SimConfig(policy=policy, num_instances=4, num_blocks=512), COST, trace, prompts)
    _check_exactly_once(res, trace)
    s = res.summary()
    assert s["completed"] == len(trace) and s["completed_more_than_once"] == 0
    assert all(0.0 <= i["idle_fraction"] < 1.0 and i["peak_kv_blocks"] > 0 for i in s["instances"])


@pytest.mark.parametrize("policy", list(POLICIES))
def test_instance_killed_mid_run_loses_nothing(policy):
    spec = TraceSpec(**{**SPEC.__dict__, "request_rate": 20.0})  # busy enough that the victim holds requests
    trace = load_trace(spec)
    prompts = [prompt_token_ids(r, spec) for r in trace]
    cfg = SimConfig(policy=policy, num_instances=4, num_blocks=512)
    # The run is deterministic, so the kill lands while instance 1 is prefilling a request (past mid-trace).
    calm = simulate(cfg, COST, trace, prompts)
    victim = next(r for r in calm.requests[len(trace) // 2:] if r.instances[0] == 1)
    mid = (victim.arrival + victim.token_times[0]) / 2
    res = simulate(replace(cfg, kill=(1, mid)), COST, trace, prompts)
    _check_exactly_once(res, trace)
    after = [r for r in res.requests if r.arrival > mid]
    assert after and all(1 not in r.instances for r in after)  # nothing new goes to the dead one
    moved = [r for r in res.requests if 1 in r.instances and r.instances[-1] != 1]
    assert moved  # some requests were on it when it died, and finished elsewhere


@pytest.mark.parametrize("policy", list(POLICIES))
def test_no_policy_recomputes_kv(policy, workload):
    """With room to spare (no preemption) and no prefix cache, every prompt token is prefilled exactly once
    and every later token decoded once, wherever the KV moved (pd-split) or which copy decoded (accellm)."""
    trace, prompts = workload
    shapes = []

    class Recording(LinearCost):
        def step_time(self, shape):
            shapes.append(shape)
            return super().step_time(shape)

    cost = Recording(**{k: v for k, v in COST.__dict__.items()})
    cfg = SimConfig(policy=policy, num_instances=4, num_blocks=4096, enable_prefix_caching=False)
    _check_exactly_once(simulate(cfg, cost, trace, prompts), trace)
    assert sum(s.prefill_tokens for s in shapes) == sum(t.prompt_tokens for t in trace)
    assert sum(s.decode_seqs for s in shapes) == sum(t.output_tokens - 1 for t in trace)


def test_deterministic_given_seed(workload):
    trace, prompts = workload
    for policy in ("prefix", "accellm"):
        a = simulate(SimConfig(policy=policy, num_instances=2, num_blocks=512, seed=7), COST, trace, prompts)
        b = simulate(SimConfig(policy=policy, num_instances=2, num_blocks=512, seed=7), COST, trace, prompts)
        assert json.dumps(a.to_json()) == json.dumps(b.to_json())


def test_pd_split_moves_kv_from_prefill_to_decode(workload):
    trace, prompts = workload
    res = simulate(SimConfig(policy="pd-split", num_instances=4, num_blocks=512), COST, trace, prompts)
    roles = {i.instance_id: i.role for i in res.instances}
    multi = [r for r in res.requests if r.output_tokens > 1]
    assert multi and all(roles[r.instances[0]] == "prefill" and roles[r.instances[-1]] == "decode" for r in multi)
    # The second token comes after the KV transfer: at least the link time of the prompt's KV.
    r = max(multi, key=lambda r: r.prompt_tokens)
    assert r.tbt[0] >= COST.kv_transfer_time(r.prompt_tokens)


def test_accellm_decodes_on_either_member_and_drops_copies_under_pressure(workload):
    trace, prompts = workload
    roomy = FleetSim(SimConfig(policy="accellm", num_instances=2, num_blocks=2048), COST, trace, prompts)
    res = roomy.run()
    _check_exactly_once(res, trace)
    assert sum(len(set(r.instances)) == 2 for r in res.requests) > len(trace) // 4  # decodes moved in the pair
    assert all(not i.replicas for i in roomy.instances)  # every spare copy released when its request ended
    spec = TraceSpec(**{**SPEC.__dict__, "request_rate": 20.0})
    busy = load_trace(spec)
    tight = FleetSim(SimConfig(policy="accellm", num_instances=2, num_blocks=64), COST, busy,
                     [prompt_token_ids(r, spec) for r in busy])
    dropped = []
    orig = tight._drop_copies
    tight._drop_copies = lambda inst, blocks, keep=None: (dropped.append(blocks), orig(inst, blocks, keep))[1]
    _check_exactly_once(tight.run(), busy)
    assert dropped  # spare copies were given up for memory before anything else

def test_prefix_routing_finds_shared_prompts(workload):
    trace, prompts = workload
    hits = {}
    for policy in ("prefix", "round-robin"):
        sim = FleetSim(SimConfig(policy=policy, num_instances=4, num_blocks=2048), COST, trace, prompts)
        sim.run()
        hits[policy] = sum(i.bm.prefix_hits for i in sim.instances)
    assert hits["prefix"] > hits["round-robin"] > 0


def _single_server(arrivals, prompt, out, step):
    trace = [TraceRequest(i, a, prompt, out) for i, a in enumerate(arrivals)]
    prompts = [[10 + i] * prompt for i in range(len(trace))]  # distinct: no prefix hits
    cost = LinearCost(kv_bytes_per_token=1, base=step)  # every step costs `step`, whatever its shape
    cfg = SimConfig(policy="round-robin", num_instances=1, num_blocks=4096, max_num_seqs=1)
    return simulate(cfg, cost, trace, prompts)


def test_single_fifo_server_matches_lindley_recursion():
    step, out = 0.05, 4  # one prefill step (first token) + 3 decode steps: service time 0.2 s
    service = out * step
    arrivals = [0.0, 0.0, 0.1, 0.75, 0.8, 2.0, 2.05, 2.1]
    res = _single_server(arrivals, 32, out, step)
    finish = 0.0
    for a, rec in zip(arrivals, sorted(res.requests, key=lambda r: int(r.request_id.split("-")[1])), strict=True):
        start = max(a, finish)
        finish = start + service
        assert rec.ttft == pytest.approx(start + step - a)
        assert rec.e2e == pytest.approx(finish - a)
        assert rec.tbt == pytest.approx([step] * (out - 1))


def test_single_server_mean_wait_matches_pollaczek_khinchine():
    # M/D/1: Poisson arrivals at rate lam, deterministic service S: mean wait in queue rho*S / (2(1 - rho)).
    step, out, rho = 0.01, 5, 0.6
    service = step * out
    lam = rho / service
    rng = random.Random(1)
    t, arrivals = 0.0, []
    for _ in range(4000):
        t += rng.expovariate(lam)
        arrivals.append(t)
    res = _single_server(arrivals, 8, out, step)
    waits = [r.e2e - service for r in res.requests]
    expected = rho * service / (2 * (1 - rho))
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.1)


def test_too_long_request_is_refused():
    trace = [TraceRequest(0, 0.0, 5000, 10)]
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        simulate(SimConfig(num_blocks=64), COST, trace, [[11] * 5000])
    with pytest.raises(InvalidRequestError, match="router_latency must be >= 0"):
        simulate(SimConfig(router_latency=-0.1), COST, [TraceRequest(0, 0.0, 8, 2)], [[11] * 8])


def test_step_noise_draws_each_step_from_the_fitted_spread():
    """A fitted cost's step_noise (quantiles of measured / fitted time): each simulated step's time is the
    formula's times a draw from them (seeded, so runs repeat); --no-step-noise gives the formula's time."""
    step, out = 0.01, 400
    trace = [TraceRequest(0, 0.0, 8, out)]
    cost = LinearCost(kv_bytes_per_token=1, base=step, step_noise=list(np.linspace(0.5, 1.5, 41)))
    cfg = SimConfig(policy="round-robin", num_instances=1, num_blocks=4096, max_num_seqs=1)
    tbt = np.array(simulate(cfg, cost, trace, [[10] * 8]).requests[0].tbt)
    assert tbt.mean() == pytest.approx(step, rel=0.05)  # uniform on [0.5, 1.5] x step
    assert tbt.min() == pytest.approx(0.5 * step, rel=0.05) and tbt.max() == pytest.approx(1.5 * step, rel=0.05)
    assert simulate(cfg, cost, trace, [[10] * 8]).requests[0].tbt == pytest.approx(list(tbt))
    flat = simulate(replace(cfg, step_noise=False), cost, trace, [[10] * 8]).requests[0].tbt
    assert flat == pytest.approx([step] * (out - 1))


def test_instances_sharing_a_host_slow_each_other_by_processor_sharing():
    """A cost with contention [1, 2] (a step runs twice as long while another instance steps): two
    one-step requests on two instances. Together from t=0, each takes 2 steps' time; the second arriving
    half a step later, the first runs alone for half its work, then both at half speed: 1.5 steps each."""
    step = 0.1
    cost = LinearCost(kv_bytes_per_token=1, base=step, contention={"*": [1.0, 2.0]})
    cfg = SimConfig(policy="round-robin", num_instances=2, num_blocks=256, step_noise=False)
    prompts = [[10] * 8, [11] * 8]
    together = simulate(cfg, cost, [TraceRequest(0, 0.0, 8, 1), TraceRequest(1, 0.0, 8, 1)], prompts)
    assert [r.ttft for r in together.requests] == pytest.approx([2 * step, 2 * step])
    staggered = simulate(cfg, cost, [TraceRequest(0, 0.0, 8, 1), TraceRequest(1, step / 2, 8, 1)], prompts)
    assert [r.ttft for r in staggered.requests] == pytest.approx([1.5 * step, 1.5 * step])
    assert [i.busy_time for i in staggered.instances] == pytest.approx([1.5 * step, 1.5 * step])
    # without contention (a device each) they do not meet; host_cores=1 gives the same table as above
    both = [TraceRequest(0, 0.0, 8, 1), TraceRequest(1, 0.0, 8, 1)]
    alone = simulate(cfg, LinearCost(kv_bytes_per_token=1, base=step), both, prompts)
    assert [r.ttft for r in alone.requests] == pytest.approx([step, step])
    cores = simulate(replace(cfg, host_cores=1), LinearCost(kv_bytes_per_token=1, base=step), both, prompts)
    assert [r.ttft for r in cores.requests] == pytest.approx([2 * step, 2 * step])
    # the fitted per-step overhead and loop gap add to each step's work
    extra = LinearCost(kv_bytes_per_token=1, base=step, step_overhead={"*": 0.01}, step_gap={"round-robin": 0.02})
    assert simulate(cfg, extra, both, prompts).requests[0].ttft == pytest.approx(step + 0.03)


@pytest.mark.parametrize("latency, on_prefill_member", [(0.0, 1), (0.001, 2), (0.025, 4)])
def test_router_messages_reach_a_stepping_instance_at_its_next_turn(latency, on_prefill_member):
    """pd-split, one request, every step 10 ms: the hand-off decided when the first token comes out
    reaches the prefill member while it runs its next step (as EngineInstance's loop steps again before the
    router answers), so it is carried out at the turn after the message arrives; the K/V then takes the
    link's 5 ms and the decode member goes on. Latency 0 is the instance deciding itself, at the boundary."""
    step, link = 0.01, 0.005
    cost = LinearCost(kv_bytes_per_token=1, base=step, link_latency=link, link_bandwidth=1e12)
    cfg = SimConfig(policy="pd-split", num_instances=2, num_blocks=256, step_noise=False, router_latency=latency)
    rec = simulate(cfg, cost, [TraceRequest(0, 0.0, 8, 5)], [[10] * 8]).requests[0]
    local = [step * (i + 1) for i in range(on_prefill_member)]
    moved = [local[-1] + link + step * (i + 1) for i in range(5 - on_prefill_member)]
    assert rec.token_times == pytest.approx(local + moved)
    assert rec.instances == [0, 1]


def test_accellm_decided_at_the_step_boundary(workload):
    """router_latency 0 and rebalance_every 0: the pair decides at each step's end (AcceLLM's design, a
    what-if for tessera's router): every request still completes once, decodes leave a prefilling member
    before its next step, and no rebalancing round is left scheduled after the last request."""
    trace, prompts = workload
    cfg = SimConfig(policy="accellm", num_instances=2, num_blocks=2048, router_latency=0.0, rebalance_every=0.0)
    sim = FleetSim(cfg, COST, trace, prompts)
    res = sim.run()
    _check_exactly_once(res, trace)
    assert sum(len(set(r.instances)) == 2 for r in res.requests) > len(trace) // 4
    assert not sim.events and all(not i.replicas and not i.ops for i in sim.instances)
