"""Contention on a shared host, fitted from real runs' step samples (tessera/fleet/contention.py): the
overlap of each step with the other instances' steps, and a known slowdown recovered from synthetic runs."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from tessera.errors import InvalidRequestError
from tessera.fleet.contention import fit_contention, overlap_shares
from tessera.fleet.cost_model import LinearCost, StepShape
from tessera.fleet.metrics import FleetResult, InstanceRecord


def rows(spans, tokens=100):
    """step_samples rows for (start, seconds) spans: [prefill tokens, pairs, decodes, context, s, start, gap]."""
    return np.array([[tokens, 0, 0, 0, d, s, 0.001] for s, d in spans], dtype=np.float64)


def test_overlap_shares_split_each_step_by_how_many_others_step():
    a = rows([(0.0, 1.0), (2.0, 1.0)])
    b = rows([(0.5, 2.0)])  # 0.5 .. 2.5
    c = rows([(0.0, 0.25), (0.6, 0.2)])
    sa, sb, sc = overlap_shares([a, b, c])
    # a's first step: 0-0.25 with c, 0.25-0.5 alone, 0.5-0.6 with b, 0.6-0.8 with b and c, 0.8-1 with b
    assert sa[0] == pytest.approx([0.25, 0.55, 0.2])
    assert sa[1] == pytest.approx([0.5, 0.5, 0.0])  # 2-2.5 with b, then alone
    assert sb[0] == pytest.approx([0.5, 0.4, 0.1])  # 1-2 alone; 0.6-0.8 with both
    assert sc.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert overlap_shares([a])[0].tolist() == [[1.0], [1.0]]


def test_fit_recovers_a_known_slowdown_and_overhead(tmp_path):
    """Two instances' steps, each step's time made from the truth: sum_k share_k * s_k * (solo + b)."""
    truth, b = [1.1, 1.7], 0.003
    solo = LinearCost(kv_bytes_per_token=1, per_prefill_token=1e-5)
    rng = random.Random(3)
    spans = [[], []]
    for inst in (0, 1):
        t = rng.random() * 0.05
        for _ in range(300):
            spans[inst].append((t, rng.uniform(0.01, 0.08)))
            t += spans[inst][-1][1] + rng.uniform(0.0, 0.06)
    inst_rows = [rows(s) for s in spans]
    for r, sh in zip(inst_rows, overlap_shares(inst_rows), strict=True):
        slow = sh @ np.array(truth)
        r[:, 0] = np.round((r[:, 4] / slow - b) / 1e-5)  # the solo time the measured one came from
        r[:, 4] = slow * (r[:, 0] * 1e-5 + b)
    run = FleetResult("least-loaded", 2, "real", [], [InstanceRecord(i, step_samples=r.tolist())
                                                         for i, r in enumerate(inst_rows)])
    path = tmp_path / "run.json"
    path.write_text(run.dumps())
    cost = fit_contention([str(path)], solo)
    key = "least-loaded/2"  # per policy and fleet size
    assert cost.contention[key] == pytest.approx(truth, rel=0.02)
    assert cost.step_overhead[key] == pytest.approx(b, abs=0.00026)
    assert cost.step_gap[key] == pytest.approx(0.001)
    assert cost.noise_by_key[key]["prefill"][20] == pytest.approx(1.0, abs=0.02)  # nothing left to explain
    assert "decode" not in cost.noise_by_key[key]  # (every synthetic step had prompt tokens)
    assert cost.slowdown_table("least-loaded", 2) == cost.contention[key]
    assert cost.slowdown_table("pd-split", 2) == cost.contention["*"]  # not fitted: the pooled fit
    assert cost.noise_factor(0.5, "least-loaded", 2, prefill=True) == pytest.approx(1.0, abs=0.02)
    assert cost.step_time(StepShape(prefill_tokens=1000)) == pytest.approx(0.01)  # the shape's cost is solo's


def test_fit_refuses_runs_without_start_times(tmp_path):
    old = FleetResult("round-robin", 1, "real", [], [InstanceRecord(0, step_samples=[[10, 55, 0, 0, 0.1]])])
    path = tmp_path / "old.json"
    path.write_text(old.dumps())
    with pytest.raises(InvalidRequestError, match="no start times"):
        fit_contention([str(path)], LinearCost(kv_bytes_per_token=1, base=0.01))


def test_simulated_steps_are_processor_sharing_in_the_real_runs_format(tmp_path):
    """The simulator's step samples, in the real fleet's format, read back by the same overlap code: each
    step did its solo work at rate 1/s_k through share_k of its wall time (noise, overhead and gap off),
    solo = measured * sum_k share_k / s_k. (The fitter's arithmetic form, measured = solo * sum_k
    share_k * s_k, is not this: tessera/fleet/contention.py says why it is kept.)"""
    from tessera.fleet.sim import SimConfig, simulate
    from tessera.fleet.trace import TraceSpec, load_trace, prompt_token_ids

    truth = [1.0, 1.4, 2.1, 2.6]
    solo = LinearCost(kv_bytes_per_token=1, base=0.004, per_prefill_token=2e-4, per_decode_seq=1e-3)
    spec = TraceSpec("conv", num_requests=150, request_rate=12.0, max_prompt_tokens=256, max_output_tokens=24,
                     vocab_size=4096)
    trace = load_trace(spec)
    cfg = SimConfig(policy="round-robin", num_instances=4, num_blocks=4096, step_noise=False)
    run = simulate(cfg, replace(solo, contention={"*": truth}), trace, [prompt_token_ids(r, spec) for r in trace])
    samples = [np.asarray(i.step_samples) for i in run.instances]
    assert [len(s) for s in samples] == [i.steps for i in run.instances]
    shares = np.vstack(overlap_shares(samples))
    rows_ = np.vstack(samples)
    assert shares[:, 1:].sum() > 0.3 * len(rows_)  # the steps did overlap
    work = rows_[:, 4] * (shares @ (1.0 / np.array(truth)))
    assert work == pytest.approx([solo.step_time(StepShape(*map(int, r[:4]))) for r in rows_], rel=1e-6)
    assert (rows_[:, 6] == 0).all()
    # fitted in that form (--contention-form rate), the table comes back
    path = tmp_path / "sim.json"
    path.write_text(run.dumps())
    rate = fit_contention([str(path)], solo, form="rate")
    assert rate.contention["round-robin/4"] == pytest.approx(truth, rel=1e-3)
    assert rate.step_overhead["round-robin/4"] == pytest.approx(0.0, abs=1e-9)
    assert rate.noise_by_key["round-robin/4"]["decode"][20] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(InvalidRequestError, match="contention form"):
        fit_contention([str(path)], solo, form="harmonic")


def test_a_runs_machine_speed_is_measured_and_matched(tmp_path, capsys):
    """A fleet run on a host running 1.3x slower than when the cost was fitted (a VM's drift between runs):
    its machine speed is read from its decode steps no other instance overlapped, the fit records the
    calibration run's, and `tessera sim --compare --match-speed` predicts the slow run at its own speed,
    where the plain prediction is 1.3x off."""
    from tessera.cli import main
    from tessera.fleet.contention import machine_speed, step_rows
    from tessera.fleet.sim import SimConfig, simulate
    from tessera.fleet.trace import TraceSpec, load_trace, prompt_token_ids

    solo = LinearCost(kv_bytes_per_token=1, base=0.004, per_prefill_token=2e-4, per_decode_seq=1e-3)
    spec = TraceSpec("conv", num_requests=60, request_rate=3.0, max_prompt_tokens=128, max_output_tokens=24,
                     vocab_size=4096)
    trace = load_trace(spec)
    prompts = [prompt_token_ids(r, spec) for r in trace]
    cfg = SimConfig(policy="least-loaded", num_instances=2, num_blocks=4096, step_noise=False)
    host = replace(solo, contention={"*": [1.0, 1.5]})
    paths = {}
    for name, speed in (("calib", 1.0), ("slow", 1.3)):
        run = simulate(cfg, replace(host, speed=speed), trace, prompts)
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(run.dumps())
    slow = json.loads(paths["slow"].read_text())
    assert machine_speed(step_rows(slow, "slow"), solo) == pytest.approx(1.3, rel=1e-6)
    fitted = fit_contention([str(paths["calib"])], solo)
    assert fitted.speed_for("least-loaded", 2) == pytest.approx(1.0, rel=1e-6)
    assert fitted.speed == 1.0
    cost = tmp_path / "cost.json"
    fitted.save(cost)
    args = ["sim", "--cost", str(cost), "--instances", "2", "--routing", "least-loaded", "--trace", "conv",
            "--num-requests", "60", "--request-rate", "3", "--max-prompt-tokens", "128", "--max-output-tokens", "24",
            "--num-blocks", "4096", "--no-step-noise", "--compare", str(paths["slow"])]
    errs = {}
    for match in (False, True):
        capsys.readouterr()
        assert main(args + ["--match-speed"] * match) == 0
        entry = json.loads(capsys.readouterr().out)["runs"][0]
        assert entry["speed"] == pytest.approx(1.3 if match else 1.0, rel=1e-6)
        errs[match] = entry["vs_real"]
    assert errs[False]["tbt_p50_ms"] < -0.15  # the plain prediction is the fitted host's speed
    assert all(abs(v) < 0.05 for v in errs[True].values()), errs[True]
    # Several runs of one command: matched to their median speed, compared with their median figures.
    for name, speed in (("slower", 2.0), ("faster", 1.1)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(simulate(cfg, replace(host, speed=speed), trace, prompts).dumps())
    capsys.readouterr()
    assert main(args + [str(paths["slower"]), str(paths["faster"]), "--match-speed"]) == 0
    entry = json.loads(capsys.readouterr().out)["runs"][0]
    assert entry["compared_runs"] == 3 and entry["speed"] == pytest.approx(1.3, rel=1e-6)
    assert all(abs(v) < 0.05 for v in entry["vs_real"].values()), entry["vs_real"]
    # needs compared runs, and runs with step samples
    assert main(args[:-2] + ["--match-speed"]) == 2
    assert "--match-speed needs --compare" in capsys.readouterr().err
