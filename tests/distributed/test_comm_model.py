"""The step-time model: its byte counts agree with the schedules', and it says what the paper says."""

from __future__ import annotations

import pytest

from tessera.distributed import comm_model as cm
from tessera.distributed.ring_attention import ring_bytes_sent, tokenring_bytes_sent


@pytest.mark.parametrize("world", [2, 4, 8])
def test_step_bytes_match_the_schedules_counts(world):
    shape = cm.AttentionShape(seq_len=64 * world, num_heads=8, num_kv_heads=2, head_dim=16, elt=2)
    lengths = [64] * world
    assert cm.ring_step_bytes(shape, world) * (world - 1) == ring_bytes_sent(lengths, 0, 2, 16, 2)
    fwd, back = cm.tokenring_step_bytes(shape, world)
    assert (fwd + back) * (world - 1) == tokenring_bytes_sent(lengths, 0, 8, 16, 2)


def test_tokenring_wins_where_communication_bounds_the_step():
    mha = cm.AttentionShape(24000, 32, 32, 128, 2)
    # The paper's setting, 4 A10s on PCIe: the ring step is bound by moving K/V, TokenRing halves it.
    p = cm.predict(mha, 4, cm.A10, cm.PCIE4)
    assert p["ring_step_s"] > p["compute_s"]
    assert p["tokenring_step_s"] < p["ring_step_s"]
    # Compute-bound (2 H100s on NVLink): the two are equal.
    p = cm.predict(mha, 2, cm.H100, cm.NVLINK4)
    assert p["ring_step_s"] == p["tokenring_step_s"] == p["compute_s"]
    # Comm-bound at 8 ranks and MHA: the ratio approaches 1/2 of the bytes one way.
    p = cm.predict(mha, 8, cm.ASCEND_910, cm.HCCS)
    assert 0.45 < p["tokenring_step_s"] / p["ring_step_s"] < 0.55
    # GQA (8 query heads a KV head): ring's K/V are a quarter of TokenRing's queries, ring wins.
    gqa = cm.AttentionShape(24000, 32, 4, 128, 2)
    p = cm.predict(gqa, 8, cm.ASCEND_910, cm.HCCS)
    assert p["ring_step_s"] < p["tokenring_step_s"]
    # A half-duplex link adds both directions up.
    half = cm.Link("half", cm.HCCS.bandwidth, cm.HCCS.latency, full_duplex=False)
    assert cm.predict(mha, 8, cm.ASCEND_910, half)["tokenring_step_s"] > p["tokenring_step_s"]


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 24]
    link = cm.fit_link(sizes, [20e-6 + s / 2e9 for s in sizes])
    assert link.latency == pytest.approx(20e-6, rel=1e-6)
    assert link.bandwidth == pytest.approx(2e9, rel=1e-6)
