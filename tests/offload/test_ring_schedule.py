"""GPU weight streaming's copy/compute order (tessera/offload/ring_schedule.py), checked on the CPU as the
abstract schedule the device streamer issues: a compute waits only for its own layer's copy, a copy into a
slot waits for the compute that last used it and nothing else, slots go round the ring, and with copies no
slower than computes the copies of the next layers overlap the current compute (simulated streams)."""

from __future__ import annotations

import pytest

from tessera.offload.ring_schedule import RingSchedule, simulate


@pytest.mark.parametrize("layers,slots,start", [(5, 3, 0), (5, 3, 2), (7, 2, 4), (2, 3, 0), (1, 1, 0)])
def test_each_op_waits_for_exactly_its_dependency(layers, slots, start):
    sched = RingSchedule(layers, slots)
    count = 3 * layers + 1  # over several cycles, ending part-way through one
    ops = sched.ops(start, count)
    issued: set[tuple[str, int]] = set()
    for op in ops:
        assert op.slot == op.position % slots and op.layer == op.position % layers
        for event in op.waits_for:  # never waits for an event the host has not issued yet
            assert event in issued, (op, event)
        if op.kind == "compute":
            assert op.waits_for == (("copied", op.position),)
            # The copies of the next slots - 1 layers were issued before this compute: they can overlap it.
            assert all(("copied", q) in issued for q in range(op.position, op.position + slots))
        elif op.kind == "copy":
            previous = op.position - slots
            assert op.waits_for == ((("released", previous),) if previous >= start else ())
            issued.add(("copied", op.position))
        else:
            assert op.kind == "release" and not op.waits_for
            issued.add(("released", op.position))
    computes = [op.position for op in ops if op.kind == "compute"]
    assert computes == list(range(start, start + count))


def test_a_slot_is_rewritten_only_after_its_compute():
    times = simulate(RingSchedule(6, 3).ops(0, 12), copy_s=1.0, compute_s=3.0)
    for p in range(12):
        assert times[("compute", p)][0] >= times[("copy", p)][1]  # compute after its copy
        assert times[("copy", p + 3)][0] >= times[("compute", p)][1]  # its slot's next copy after it


@pytest.mark.parametrize("slots", [2, 3])
def test_copies_overlap_computes(slots):
    """Copy-bound (copy 1.0 > compute 0.6): the copy stream never idles, so n layers take n copies plus the
    last compute, not n x (copy + compute); compute-bound: n computes plus the first copy."""
    n = 20
    ops = RingSchedule(8, slots).ops(0, n)
    times = simulate(ops, copy_s=1.0, compute_s=0.6)
    assert times[("compute", n - 1)][1] == pytest.approx(n * 1.0 + 0.6)
    times = simulate(ops, copy_s=0.5, compute_s=1.0)
    assert times[("compute", n - 1)][1] == pytest.approx(0.5 + n * 1.0)
    one_slot = simulate(RingSchedule(8, 1).ops(0, n), copy_s=0.5, compute_s=1.0)
    assert one_slot[("compute", n - 1)][1] == pytest.approx(n * 1.5)  # one buffer: no overlap at all


def test_bad_ring_is_refused():
    with pytest.raises(ValueError, match="a ring needs"):
        RingSchedule(4, 0)
