"""LayerStreamer: brings streamed decoder layers in from a layer pack, one region per read, into a few
reusable buffers, with a reader thread that reads the next layers while the current one computes.

The layers are consumed in a fixed cycle (the pack's order, every step), so the reader always knows
what comes next: with N buffers it runs up to N layers ahead and waits for the oldest buffer to be
released. A region is read whole (its layout's bytes, quantized planes and scales included) and used in
place: each buffer has a layer shell per layout whose tensors are views into it, made once. Torch ops and
preadv both release the GIL, so reading overlaps computing even with the reader written in Python.

Reads keep the page cache out of it, two ways (TESSERA_OFFLOAD_IO): "direct", the default, uses O_DIRECT
(aligned buffers, offsets and lengths; one call per region, so that the block layer has many requests in
flight; where a file system refuses O_DIRECT it falls back to buffered); "buffered" reads 16 MiB at a time
through the page cache and drops each chunk at once (POSIX_FADV_DONTNEED). On the 2-core VM of
docs/benchmarks.md buffered reads with the kernel's 8 MiB read-ahead ran faster alone (2.0 against 1.5
GB/s) but not while both cores computed (their copies out of the page cache compete for the cores), and
left 0.4-0.5 GB in the page cache against O_DIRECT's ~0.

Failure: a read that fails or comes up short (a truncated or unreadable pack) raises WeightStreamError,
naming the file and layer, in the thread that waits for that layer; the streamer then closes itself
(reader thread joined, buffers, layer shells and the file descriptor dropped), and the next use opens
everything afresh, so an engine stays usable once the file is back.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tessera.errors import TesseraError
from tessera.offload.layer_pack import ALIGN, LayerLayout, region_offset

log = logging.getLogger(__name__)

MAX_READ = 1 << 30  # bytes per O_DIRECT preadv call (Linux caps one call just under 2 GiB)
BUFFERED_CHUNK = 16 << 20  # bytes per buffered read, dropped from the page cache right after


class WeightStreamError(TesseraError):
    """A streamed layer could not be read (the layer pack is missing, truncated or unreadable)."""


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose address is ALIGN-aligned (O_DIRECT's requirement)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes]


class RegionReader:
    """Reads byte ranges of one file into aligned buffers, around the page cache."""

    def __init__(self, path: Path, direct: bool | None = None):
        self.path = path
        env = os.environ.get("TESSERA_OFFLOAD_IO", "direct")
        if env not in ("buffered", "direct"):
            raise ValueError(f"TESSERA_OFFLOAD_IO must be 'buffered' or 'direct', got {env!r}")
        want_direct = direct if direct is not None else env == "direct"
        self.mode = "buffered"
        self.fd = -1
        if want_direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.mode = "direct"
            except OSError as e:
                if e.errno != 22:  # EINVAL: this file system has no O_DIRECT; anything else is real
                    raise
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)

    def read(self, buf: torch.Tensor, offset: int, nbytes: int) -> None:
        """Fill buf[:nbytes] from the file at `offset`; raises EOFError if the file ends first."""
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = min(nbytes - done, MAX_READ if self.mode == "direct" else BUFFERED_CHUNK)
            try:
                got = os.preadv(self.fd, [view[done:done + n]], offset + done)
            except OSError as e:
                if e.errno != 22 or self.mode != "direct" or done:
                    raise
                # O_DIRECT refused at read time (some file systems accept the flag at open): go buffered.
                os.close(self.fd)
                self.fd, self.mode = os.open(self.path, os.O_RDONLY), "buffered"
                continue
            if got <= 0 or (self.mode == "direct" and got < n):  # O_DIRECT reads come up short only at the end
                raise EOFError(f"the file ends at byte {offset + done}, before byte {offset + nbytes}")
            if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, offset + done, got, os.POSIX_FADV_DONTNEED)
            done += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class StreamStats:
    bytes_read: int = 0
    layers_read: int = 0
    read_s: float = 0.0  # reader thread time inside reads
    wait_s: float = 0.0  # compute thread time spent waiting for a layer (the part reading did not hide)
    io_mode: str = ""

    def as_dict(self) -> dict:
        gb_s = self.bytes_read / self.read_s / 1e9 if self.read_s else 0.0
        return {"bytes_read": self.bytes_read, "layers_read": self.layers_read, "read_s": round(self.read_s, 3),
                "wait_s": round(self.wait_s, 3), "read_gb_s": round(gb_s, 3), "io_mode": self.io_mode}


class _Pipeline:
    """One open pack: buffers, their layer shells, and the reader thread, from cycle position `start`."""

    def __init__(self, path: Path, layouts: list[LayerLayout], order: list[int],
                 make_layer: Callable[[LayerLayout, dict], nn.Module], num_buffers: int, start: int,
                 stats: StreamStats):
        self.path, self.layouts, self.order, self.stats = path, layouts, order, stats
        self.region_bytes = max(lay.region_bytes for lay in layouts)
        try:
            self.reader = RegionReader(path)
        except OSError as e:
            raise WeightStreamError(f"cannot open the layer pack {path}: {e}") from e
        stats.io_mode = self.reader.mode
        self.bufs = [aligned_buffer(self.region_bytes) for _ in range(num_buffers)]
        distinct = list({id(lay): lay for lay in layouts}.values())
        # shells[s][id(layout)]: a layer whose tensors are views into buffer s as `layout` places them
        self.shells = [{id(lay): make_layer(lay, lay.views(b)) for lay in distinct} for b in self.bufs]
        self.free = [threading.Semaphore(1) for _ in self.bufs]
        self.ready = [threading.Semaphore(0) for _ in self.bufs]
        self.error: WeightStreamError | None = None
        self.stopping = False
        self.pos = start  # the consumer's cycle position
        self.thread = threading.Thread(target=self._run, args=(start,), name="tessera-weight-reader", daemon=True)
        self.thread.start()

    @property
    def next_layer(self) -> int:
        return self.order[self.pos % len(self.order)]

    def _run(self, pos: int) -> None:
        n = len(self.bufs)
        while True:
            s = pos % n
            self.free[s].acquire()
            if self.stopping:
                return
            k = pos % len(self.order)
            nbytes = self.layouts[k].region_bytes
            t0 = time.perf_counter()
            try:
                self.reader.read(self.bufs[s], region_offset(k, self.region_bytes), nbytes)
            except (OSError, EOFError) as e:
                self.error = WeightStreamError(f"cannot read decoder layer {self.order[k]} from the layer pack "
                                               f"{self.path}: {e}")
                self.ready[s].release()
                return
            self.stats.read_s += time.perf_counter() - t0
            self.stats.bytes_read += nbytes
            self.stats.layers_read += 1
            self.ready[s].release()
            pos += 1

    def acquire(self) -> nn.Module:
        s = self.pos % len(self.bufs)
        t0 = time.perf_counter()
        self.ready[s].acquire()
        self.stats.wait_s += time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        return self.shells[s][id(self.layouts[self.pos % len(self.order)])]

    def release(self) -> None:
        self.free[self.pos % len(self.bufs)].release()
        self.pos += 1

    def close(self) -> None:
        self.stopping = True
        for sem in self.free:
            sem.release()
        self.thread.join()
        self.reader.close()
        self.bufs, self.shells = [], []


_OPEN: weakref.WeakSet = weakref.WeakSet()  # streamers with a reader thread, stopped at exit


@atexit.register
def _close_all() -> None:
    # A reader thread still running while the interpreter finalizes aborts the process; stop them first.
    for streamer in list(_OPEN):
        streamer.close()


class LayerStreamer:
    """Streams the layers `order` (in pack order) of the pack at `path`, the k-th laid out as `layouts[k]`
    (one layout for all: pass it alone); `make_layer(layout, views)` builds a module whose tensors are the
    given views (one per buffer and layout, made once)."""

    def __init__(self, path: Path, layouts: LayerLayout | list[LayerLayout], order: list[int],
                 make_layer: Callable[[LayerLayout, dict], nn.Module], num_buffers: int = 2):
        self.path, self.order = path, list(order)
        self.layouts = [layouts] * len(self.order) if isinstance(layouts, LayerLayout) else list(layouts)
        if len(self.layouts) != len(self.order):
            raise ValueError(f"{len(self.layouts)} layouts for {len(self.order)} streamed layers")
        self.region_bytes = max(lay.region_bytes for lay in self.layouts)
        self.make_layer = make_layer
        self.num_buffers = num_buffers
        self.stats = StreamStats()
        self._pipeline: _Pipeline | None = None
        self._lock = threading.Lock()

    @property
    def buffer_bytes(self) -> int:
        """What the buffers take while open (aligned allocations included)."""
        return self.num_buffers * (self.region_bytes + ALIGN)

    @property
    def is_open(self) -> bool:
        return self._pipeline is not None

    @contextlib.contextmanager
    def layer(self, index: int):
        """Decoder layer `index`, resident in a buffer for the duration of the block."""
        with self._lock:
            p = self._pipeline
            if p is None or p.next_layer != index:
                # First use, after an error, or a forward pass that stopped part-way: start the cycle here.
                self.close()
                p = self._pipeline = self._open(self.order.index(index))
            try:
                module = p.acquire()
            except WeightStreamError:
                self.close()
                raise
        try:
            yield module
        finally:
            p.release()

    def _open(self, start: int):
        """The pipeline from cycle position `start`: a reader thread filling host buffers from the pack.
        (Whatever it returns has next_layer, acquire(), release() and close(); DeviceLayerStreamer's is a ring
        of device buffers.)"""
        _OPEN.add(self)
        return _Pipeline(self.path, self.layouts, self.order, self.make_layer, self.num_buffers, start, self.stats)

    def close(self) -> None:
        """Stop the reader and free the buffers (reopened on the next use)."""
        p, self._pipeline = self._pipeline, None
        _OPEN.discard(self)
        if p is not None:
            p.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
