"""Step cost models: the fit recovers known coefficients, the H100 roofline gives the published-figure
arithmetic, the JSON round trip, and timing real engine steps (a tiny random model) feeds the fit."""

from __future__ import annotations

import random

import pytest

from tessera.errors import InvalidRequestError
from tessera.fleet.cost_model import LinearCost, StepShape, llama2_70b_h100, load_cost_model


def test_step_shape_counts_prefill_pairs_and_decode_context():
    s = StepShape.of([(0, 4, False), (10, 2, False), (7, 1, True), (20, 1, True)])
    assert s.prefill_tokens == 6 and s.decode_seqs == 2 and s.decode_context == 8 + 21
    assert s.prefill_pairs == (1 + 2 + 3 + 4) + (11 + 12)  # each new token attends to everything before it


def test_fit_recovers_coefficients():
    truth = LinearCost(base=0.004, per_prefill_token=3e-5, per_prefill_pair=2e-9, per_decode_seq=4e-4,
                       per_decode_context=5e-7)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        chunks = [(rng.randrange(0, 2000), rng.randrange(1, 300), False) for _ in range(rng.randrange(0, 3))]
        chunks += [(rng.randrange(1, 900), 1, True) for _ in range(rng.randrange(0, 20))]
        shape = StepShape.of(chunks)
        if shape.prefill_tokens + shape.decode_seqs:
            samples.append((shape, truth.step_time(shape) * rng.uniform(0.995, 1.005)))
    fit = LinearCost.fit(samples)
    assert fit.coefficients() == pytest.approx(truth.coefficients(), rel=0.1)
    assert fit.fit_stats["median_rel_error"] < 0.02
    # the spread of measured / fitted, kept for the simulator's draws: here the +-0.5% noise put in
    assert len(fit.step_noise) == 41 and fit.step_noise == sorted(fit.step_noise)
    assert 0.95 < fit.step_noise[0] < 1.0 < fit.step_noise[-1] < 1.05
    assert fit.noise_factor(0.5) == pytest.approx(1.0, abs=0.01) and truth.noise_factor(0.9) == 1.0
    with pytest.raises(InvalidRequestError):
        LinearCost.fit(samples[:3])


def test_h100_roofline_arithmetic():
    c = llama2_70b_h100(tp=8)
    assert c.kv_bytes_per_token == 327680  # 2 (K, V) x 80 layers x 8 KV heads x 128 x 2 bytes
    # One decode sequence: weight-bandwidth bound, 2 x 68.98e9 bytes over 8 x 3.35 TB/s x 0.7, + overhead.
    t = c.step_time(StepShape.of([(100, 1, True)]))
    assert t == pytest.approx(2 * 68.98e9 / (8 * 3.35e12 * 0.7) + c.overhead, rel=1e-3)
    # A 4096-token prefill: compute bound at 989 TFLOP/s x 0.5 on 8 chips.
    flops = 2 * 68.98e9 * 4096 + 4 * 80 * 8192 * (4096 * 4097 // 2)
    assert c.step_time(StepShape.of([(0, 4096, False)])) == pytest.approx(flops / (8 * 989e12 * 0.5) + c.overhead)
    # Moving a 1000-token prompt's KV (328 MB) over 400 GB/s.
    assert c.kv_transfer_time(1000) == pytest.approx(20e-6 + 327680e3 / 400e9)


def test_cost_model_json_round_trip(tmp_path):
    for cost in (LinearCost(kv_bytes_per_token=9, base=0.1, per_decode_seq=0.2, fit_stats={"r2": 0.9}),
                 llama2_70b_h100(tp=4)):
        cost.save(tmp_path / "c.json")
        back = load_cost_model(tmp_path / "c.json")
        assert type(back) is type(cost) and back == cost
    (tmp_path / "bad.json").write_text('{"kind": "quantum"}')
    with pytest.raises(InvalidRequestError, match="unknown cost model"):
        load_cost_model(tmp_path / "bad.json")


def test_time_steps_on_a_real_engine_feeds_the_fit(model_dir):
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.fleet.fit import time_steps

    engine = LLMEngine(EngineConfig(model=str(model_dir("llama")), dtype="float32", max_num_batched_tokens=64,
                                    kv_cache_memory=8 << 20), progress=False)
    samples = time_steps(engine, batches=(1, 4), prompts=(8, 96), output_tokens=4)
    shapes = [s for s, _ in samples]
    assert all(t > 0 for _, t in samples)
    assert any(s.prefill_tokens == 64 for s in shapes)  # a 96-token prompt is chunked at the 64-token budget
    assert any(s.decode_seqs == 4 and not s.prefill_tokens for s in shapes)
    # 2 configs x (1 or 4 requests): every prompt token prefilled once, every request decoded 3 times.
    assert sum(s.prefill_tokens for s in shapes) == 8 + 96 + 4 * 8 + 4 * 96
    assert sum(s.decode_seqs for s in shapes) == 3 * (1 + 1 + 4 + 4)
    fit = LinearCost.fit(samples)
    assert all(fit.step_time(s) > 0 for s in shapes)
    assert engine.scheduler.schedule.__name__ == "schedule"  # the engine is left as it was


def test_sim_fit_command_writes_a_cost_model(model_dir, tmp_path):
    from tessera.cli import main

    out = tmp_path / "cost.json"
    assert main(["sim", "fit", "--model", str(model_dir("llama")), "--dtype", "float32", "--kv-cache-memory", "8MB",
                 "--batches", "1", "2", "--prompts", "8", "16", "--output-tokens", "3", "--output", str(out)]) == 0
    cost = load_cost_model(out)
    assert isinstance(cost, LinearCost) and cost.fit_stats["num_steps"] >= 10
    assert cost.num_layers == 2 and cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K+V x layers x heads x dim x fp32
    assert cost.step_time(StepShape.of([(0, 16, False)])) > 0


def test_sim_fit_from_the_steps_of_real_runs(model_dir, tmp_path, capsys):
    """`tessera sim fit --from-runs`: the cost is fitted from the step samples a fleet run recorded."""
    from tessera.cli import main
    from tessera.fleet.metrics import FleetResult, InstanceRecord

    truth = LinearCost(base=0.03, per_prefill_token=4e-4, per_decode_seq=2e-3, per_decode_context=1e-6)
    rng = random.Random(1)
    rows = []
    for _ in range(60):
        shape = StepShape.of([(0, rng.randrange(1, 256), False)] * rng.randrange(0, 2)
                             + [(rng.randrange(1, 300), 1, True)] * rng.randrange(1, 12))
        rows.append([shape.prefill_tokens, shape.prefill_pairs, shape.decode_seqs, shape.decode_context,
                     truth.step_time(shape)])
    paths = []
    for i in range(2):  # one file per run, the instances' samples pooled
        res = FleetResult("round-robin", 1, "real", [], [InstanceRecord(0, kv_bytes_per_block=16 * 72,
                                                                        step_samples=rows[i::2])],
                          {"engine": {"block_size": 16}})
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(res.dumps())
    out = tmp_path / "cost.json"
    assert main(["sim", "fit", "--model", str(model_dir("llama")), "--from-runs", *map(str, paths),
                 "--output", str(out)]) == 0
    cost = load_cost_model(out)
    assert cost.fit_stats["num_steps"] == 60 and cost.kv_bytes_per_token == 72 and cost.num_layers == 2
    assert cost.coefficients()[[0, 1, 3, 4]] == pytest.approx(truth.coefficients()[[0, 1, 3, 4]], rel=0.05)
    empty = FleetResult("x", 1, "real", [], [InstanceRecord(0)])
    (tmp_path / "empty.json").write_text(empty.dumps())
    capsys.readouterr()
    assert main(["sim", "fit", "--model", str(model_dir("llama")), "--from-runs", str(tmp_path / "empty.json")]) == 2
    assert "no step samples" in capsys.readouterr().err
