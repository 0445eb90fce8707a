"""The layer pack: the streamed decoder layers written once, in the form the layer computes with (the
compute dtype, fused q/k/v and gate/up; quantized linears as the bit-plane kernel's tiles with their
scales and offsets), as one contiguous aligned region per layer, so that bringing a layer in is one large
sequential read of exactly the bytes the layer multiplies by.

File format (little-endian):

    [0, HEADER)               a JSON header, padded with spaces: format, version, the key it was built
                              for (the layer indices in file order, the layouts and which region has which)
    [HEADER + k * region, ...) layer k's region: its tensors at its layout's offsets, zero padding to a
                              multiple of 4096 (O_DIRECT wants offsets, lengths and addresses aligned)

Dense layers of a model all have one layout; quantized ones may have a few (a GGUF Q4_K_M file keeps
some layers' attn_v / ffn_down at 6 bits), so the key lists the distinct layouts and each region's,
and every region is as large as the largest. A pack is reused when its header's key equals the one
wanted (the checkpoint's files with their sizes and modification times, the dtype, the quantization,
the layer set): a changed checkpoint or budget writes a new pack. It is written to a temporary file and
renamed into place, so a pack that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tessera.errors import ModelLoadError

FORMAT = "tessera-layer-pack"
VERSION = 2
ALIGN = 4096  # the I/O alignment (O_DIRECT)
HEADER = 16 * ALIGN  # the header's size: a few layouts of a few dozen tensors each, and the layer list
TENSOR_ALIGN = 64


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Slot:
    name: str  # the tensor's name inside a DecoderLayer, e.g. "self_attn.qkv_proj.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    slots: tuple[Slot, ...]
    region_bytes: int  # padded to ALIGN

    @classmethod
    def build(cls, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> LayerLayout:
        """Consecutive TENSOR_ALIGN-aligned slots for (name, shape, dtype), in order."""
        slots, at = [], 0
        for name, shape, dtype in tensors:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            slots.append(Slot(name, tuple(shape), dtype, at, n))
            at = _align(at + n, TENSOR_ALIGN)
        return cls(tuple(slots), _align(at, ALIGN))

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype) -> LayerLayout:
        """The layout of `layer`'s parameters (a DecoderLayer, on any device incl. meta) in `dtype`."""
        return cls.build([(name, tuple(p.shape), dtype) for name, p in layer.named_parameters()])

    @property
    def nbytes(self) -> int:
        """The tensors' bytes, as resident parameters (no padding)."""
        return sum(s.nbytes for s in self.slots)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view into `buf` (uint8, at least region_bytes)."""
        return {s.name: buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots}

    def to_json(self) -> dict:
        return {"region_bytes": self.region_bytes,
                "slots": [[s.name, list(s.shape), str(s.dtype).removeprefix("torch."), s.offset, s.nbytes]
                          for s in self.slots]}


def pack_key(files: list[Path], dtype: torch.dtype, layers: list[int], layouts: list[LayerLayout],
             quantization: str | None = None) -> dict:
    """What a pack was built from: a pack is reused only for the same key. `layouts`: one per entry of
    `layers` (the same object where layers share one)."""
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    # The files by digest: a sharded checkpoint's list would not fit the header.
    files_digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    distinct = list({id(lay): lay for lay in layouts}.values())
    return {"checkpoint": str(files[0].parent.resolve()), "files": files_digest, "dtype": str(dtype),
            "quantization": quantization, "layers": list(layers),
            "region_bytes": max((lay.region_bytes for lay in layouts), default=ALIGN),
            "layouts": [lay.to_json() for lay in distinct],
            "region_layout": [next(i for i, d in enumerate(distinct) if d is lay) for lay in layouts]}


def pack_path(directory: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return directory / f"layers-{digest}.pack"


def read_header(path: Path) -> dict | None:
    """The header of an existing pack, or None if there is none or it is not a whole pack."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(HEADER).decode().rstrip())
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        return None
    if size != HEADER + len(header["key"]["layers"]) * header["key"]["region_bytes"]:
        return None
    return header


def region_offset(position: int, region_bytes: int) -> int:
    """The file offset of the `position`-th region, regions being `region_bytes` apart."""
    return HEADER + position * region_bytes


class PackWriter:
    """Writes a pack region by region (`write(position, buf)`), to a temporary file renamed into place
    by `finish()`; `abort()` removes it."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        header = json.dumps({"format": FORMAT, "version": VERSION, "key": key}).encode()
        if len(header) > HEADER:
            raise ModelLoadError(f"layer pack header too large ({len(header)} bytes)")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.layout_bytes = key["region_bytes"]
        self.count = len(key["layers"])
        os.pwrite(self.fd, header.ljust(HEADER, b" "), 0)
        os.ftruncate(self.fd, HEADER + self.count * self.layout_bytes)
        self.written: set[int] = set()

    def write(self, position: int, buf: torch.Tensor) -> None:
        view = memoryview(buf[: self.layout_bytes].numpy())
        at, done = HEADER + position * self.layout_bytes, 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], at + done)
        # Written once, read back around the page cache: do not let the written pages linger in it.
        os.fdatasync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, at, self.layout_bytes, os.POSIX_FADV_DONTNEED)
        self.written.add(position)

    def finish(self) -> None:
        missing = sorted(set(range(self.count)) - self.written)
        if missing:
            self.abort()
            raise ModelLoadError(f"layer pack {self.path}: regions {missing[:8]} were never written")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
