"""The order of copies and computes when streamed layers go through a ring of device buffers (GPU weight
streaming, tessera.offload.device_streamer), as plain data: the device streamer issues exactly these
operations, and the tests check their ordering, and the overlap it allows, without a GPU.

Positions count the streamed layers as the model meets them, cycle after cycle (position p is streamed
layer p % num_layers of the pack, in device buffer p % slots). The host issues, in this order:

    copy(start) ... copy(start + slots - 1)          fill the ring
    for each position p from start:
        compute(p)        on the compute stream, after waiting for the event copied(p)
        release(p)        the event released(p), recorded on the compute stream after compute(p)
        copy(p + slots)   on the copy stream, after waiting for released(p) (the slot's previous user)

So a compute waits only for its own layer's copy, a copy waits only for the compute that last used its
buffer, and while layer p computes the copies of p + 1 ... p + slots - 1 may run: with copies no slower
than computes, the copy engine never idles and the computes never wait after the first. Neither stream
waits on the host; the host never waits on either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    kind: str  # "copy", "compute" or "release"
    position: int
    slot: int
    layer: int  # index into the streamed layers (the pack's order)
    waits_for: tuple[tuple[str, int], ...] = ()  # events waited on first: ("copied" | "released", position)


@dataclass(frozen=True)
class RingSchedule:
    num_layers: int  # streamed layers per cycle
    slots: int  # device buffers in the ring

    def __post_init__(self):
        if self.num_layers < 1 or self.slots < 1:
            raise ValueError(f"a ring needs layers and slots, got {self.num_layers} and {self.slots}")

    def slot(self, position: int) -> int:
        return position % self.slots

    def layer(self, position: int) -> int:
        return position % self.num_layers

    def copy(self, position: int, start: int) -> Op:
        """The copy of `position` into its slot; after the slot's previous user, if the ring has had one."""
        previous = position - self.slots
        waits = (("released", previous),) if previous >= start else ()
        return Op("copy", position, self.slot(position), self.layer(position), waits)

    def fill(self, start: int) -> list[Op]:
        """What opening the ring at `start` issues: a copy per slot."""
        return [self.copy(p, start) for p in range(start, start + self.slots)]

    def step(self, position: int, start: int) -> list[Op]:
        """What using layer `position` issues: its compute, the release of its slot, the next copy into it."""
        s, k = self.slot(position), self.layer(position)
        return [Op("compute", position, s, k, (("copied", position),)), Op("release", position, s, k),
                self.copy(position + self.slots, start)]

    def ops(self, start: int, count: int) -> list[Op]:
        """The host's issue order for `count` layers from `start`."""
        out = self.fill(start)
        for p in range(start, start + count):
            out += self.step(p, start)
        return out


def simulate(ops: list[Op], copy_s: float, compute_s: float) -> dict[tuple[str, int], tuple[float, float]]:
    """Run `ops` on two in-order streams (copies on one, computes on the other), each op starting once its
    stream is free and the events it waits for have fired: (kind, position) -> (start, end) times. Copies
    that the host issued but no compute used (the prefetch past the end) are included."""
    stream_free = {"copy": 0.0, "compute": 0.0}
    fired: dict[tuple[str, int], float] = {}
    times = {}
    for op in ops:
        if op.kind == "release":  # an event recorded on the compute stream after the compute before it
            fired[("released", op.position)] = stream_free["compute"]
            continue
        ready = max([stream_free[op.kind]] + [fired[w] for w in op.waits_for])
        end = ready + (copy_s if op.kind == "copy" else compute_s)
        stream_free[op.kind] = end
        times[(op.kind, op.position)] = (ready, end)
        if op.kind == "copy":
            fired[("copied", op.position)] = end
    return times
