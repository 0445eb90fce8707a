"""The shared fleet result record: derived latencies, percentiles and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from tessera.fleet.metrics import FleetResult, InstanceRecord, RequestRecord, compare


def test_request_latencies():
    r = RequestRecord("a", arrival=1.0, prompt_tokens=10, token_times=[1.5, 1.7, 2.0], finish=2.0, completions=1)
    assert r.ttft == pytest.approx(0.5)
    assert r.tbt == pytest.approx([0.2, 0.3])
    assert r.e2e == pytest.approx(1.0)
    assert RequestRecord("b", 0.0, 1).ttft is None and RequestRecord("b", 0.0, 1).e2e is None


def test_summary_percentiles_idle_and_round_trip():
    reqs = [RequestRecord(str(i), arrival=0.0, prompt_tokens=4, token_times=[0.1 * (i + 1), 0.1 * (i + 1) + 0.05],
                          finish=0.1 * (i + 1) + 0.05, completions=1) for i in range(10)]
    inst = [InstanceRecord(0, busy_time=0.25, span=1.0, peak_kv_blocks=7, kv_bytes_per_block=100)]
    res = FleetResult("least-loaded", 1, "sim", reqs, inst, {"seed": 0})
    s = res.summary()
    assert s["completed"] == 10 and s["completed_more_than_once"] == 0
    assert s["ttft"]["p50_ms"] == pytest.approx(550.0)  # median of 100..1000 ms
    assert s["ttft"]["p99_ms"] == pytest.approx(991.0)  # numpy's linear interpolation
    assert s["tbt"]["p50_ms"] == pytest.approx(50.0)
    assert s["instances"][0]["idle_fraction"] == pytest.approx(0.75)
    assert s["peak_kv_bytes_max"] == 700
    back = FleetResult.from_json(json.loads(res.dumps()))
    assert back.summary() == s
    err = compare(s, {**s, "ttft": {"p50_ms": 500.0, "p99_ms": 991.0}})
    assert err["ttft_p50_ms"] == pytest.approx(0.1) and err["ttft_p99_ms"] == pytest.approx(0.0)
