"""DeviceLayerStreamer: weight streaming on a GPU. The streamed layers' pack regions are loaded once into
pinned host memory; a small ring of device buffers takes them in turn, copied on a separate CUDA stream, with
events so that a layer's compute waits only for its own copy and the copies of the next layers overlap it
(the order is tessera.offload.ring_schedule's, which the CPU tests check). The same interface as the CPU's
LayerStreamer (tessera.offload.streamer): `layer(index)` lends a layer whose tensors are views into a device
buffer, `close()` frees the buffers (here the pinned copy too; the next use loads it again).

Not measured yet: no GPU was available when this was written (docs/benchmarks.md says so); the CUDA
tests are marked `gpu` (`make test-gpu`).

A read error while loading the pack raises WeightStreamError and frees what was made. Once the pack is in
pinned memory nothing is read from disk while decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tessera.offload.layer_pack import LayerLayout, region_offset
from tessera.offload.ring_schedule import Op, RingSchedule
from tessera.offload.streamer import LayerStreamer, RegionReader, StreamStats, WeightStreamError

DEVICE_NUM_BUFFERS = 3  # while layer p computes, the copies of p + 1 and p + 2 may run


def pinned_empty(nbytes: int) -> torch.Tensor:
    """Page-locked host bytes (the copy engine reads them directly, and asynchronously)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def load_pinned(path: Path, layouts: list[LayerLayout], region_bytes: int) -> torch.Tensor:
    """Every region of the pack at `path`, in pack order, in one pinned host buffer (region k at k * region_bytes)."""
    host = pinned_empty(len(layouts) * region_bytes)
    try:
        reader = RegionReader(path)
    except OSError as e:
        raise WeightStreamError(f"cannot open the layer pack {path}: {e}") from e
    try:
        for k, layout in enumerate(layouts):
            try:
                reader.read(host[k * region_bytes:(k + 1) * region_bytes], region_offset(k, region_bytes),
                            layout.region_bytes)
            except (OSError, EOFError) as e:
                raise WeightStreamError(f"cannot read streamed layer {k} from the layer pack {path}: {e}") from e
    finally:
        reader.close()
    return host


class _Ring:
    """One open ring: the pinned regions, the device buffers with their layer shells, the copy stream and
    the events, from cycle position `start` (the streamed layers being `order`)."""

    def __init__(self, path: Path, layouts: list[LayerLayout], order: list[int], make_layer, num_buffers: int,
                 start: int, device: torch.device, stats: StreamStats):
        self.layouts, self.order, self.device, self.stats, self.start = layouts, order, device, stats, start
        self.region_bytes = max(lay.region_bytes for lay in layouts)
        self.schedule = RingSchedule(len(layouts), num_buffers)
        self.host = load_pinned(path, layouts, self.region_bytes)
        self.bufs = [torch.empty(self.region_bytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)]
        distinct = list({id(lay): lay for lay in layouts}.values())
        self.shells = [{id(lay): make_layer(lay, lay.views(b)) for lay in distinct} for b in self.bufs]
        self.copy_stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in self.bufs]
        self.released = [torch.cuda.Event() for _ in self.bufs]
        self.pos = start
        for op in self.schedule.fill(start):
            self._run(op)

    @property
    def next_layer(self) -> int:
        return self.order[self.schedule.layer(self.pos)]

    def _run(self, op: Op) -> None:
        """Issue one operation of the schedule (a copy, or a release event; computes are the caller's)."""
        s = op.slot
        if op.kind == "release":
            self.released[s].record(torch.cuda.current_stream(self.device))
            return
        assert op.kind == "copy", op
        nbytes = self.layouts[op.layer].region_bytes
        with torch.cuda.stream(self.copy_stream):
            for event, _ in op.waits_for:  # only ("released", the slot's previous position)
                self.copy_stream.wait_event(self.released[s] if event == "released" else self.copied[s])
            at = op.layer * self.region_bytes
            self.bufs[s][:nbytes].copy_(self.host[at:at + nbytes], non_blocking=True)
            self.copied[s].record(self.copy_stream)
        self.stats.bytes_read += nbytes
        self.stats.layers_read += 1

    def acquire(self) -> nn.Module:
        compute, release, copy = self.schedule.step(self.pos, self.start)
        torch.cuda.current_stream(self.device).wait_event(self.copied[compute.slot])
        self._after = (release, copy)
        return self.shells[compute.slot][id(self.layouts[compute.layer])]

    def release(self) -> None:
        for op in self._after:  # the slot's release event, then the next copy into it
            self._run(op)
        self.pos += 1

    def close(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()  # nothing may still read the buffers
        self.bufs, self.shells, self.host = [], [], None


class DeviceLayerStreamer(LayerStreamer):
    """Streams the layers `order` of the pack at `path` (the k-th laid out as `layouts[k]`) through a ring of
    `num_buffers` buffers on `device` (CUDA), from pinned host memory. LayerStreamer's `layer(index)` and
    `close()`, with the ring in place of the reader thread."""

    link = "pinned host memory -> device"

    def __init__(self, path: Path, layouts: LayerLayout | list[LayerLayout], order: list[int],
                 make_layer: Callable[[LayerLayout, dict], nn.Module], num_buffers: int, device: torch.device):
        super().__init__(path, layouts, order, make_layer, num_buffers)
        self.device = torch.device(device)
        self.stats = StreamStats(io_mode="pinned->cuda")

    @property
    def buffer_bytes(self) -> int:
        """Device memory the ring takes while open."""
        return self.num_buffers * self.region_bytes

    @property
    def host_bytes(self) -> int:
        """Pinned host memory the streamed layers take while open."""
        return len(self.order) * self.region_bytes

    def _open(self, start: int) -> _Ring:
        """The ring from cycle position `start` (closing it frees the pinned copy too; reloaded on reopening)."""
        return _Ring(self.path, self.layouts, self.order, self.make_layer, self.num_buffers, start, self.device,
                     self.stats)

    def h2d_bandwidth(self, passes: int = 3) -> list[float]:
        """Bytes/s of `passes` copies of every pinned region into one device buffer, back to back on the copy
        path alone (CUDA events), the link's rate that the decode's copies are compared with."""
        if self._pipeline is None:
            self._pipeline = self._open(0)
        ring, rates = self._pipeline, []
        dst = ring.bufs[0]
        stream = torch.cuda.Stream(self.device)
        torch.cuda.synchronize(self.device)
        for _ in range(passes):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            nbytes = 0
            with torch.cuda.stream(stream):
                t0.record(stream)
                for k, layout in enumerate(self.layouts):
                    at = k * self.region_bytes
                    dst[:layout.region_bytes].copy_(ring.host[at:at + layout.region_bytes], non_blocking=True)
                    nbytes += layout.region_bytes
                t1.record(stream)
            t1.synchronize()
            rates.append(nbytes / (t0.elapsed_time(t1) / 1e3))
        self.close()  # the measurement scribbled over buffer 0: the ring reopens cleanly on the next use
        return rates
