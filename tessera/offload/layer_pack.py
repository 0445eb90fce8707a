"""The layer pack: the streamed decoder layers written once, in the compute dtype and already fused, as one
contiguous aligned region per layer, so that bringing a layer in is one large sequential read.

File format (little-endian):

    [0, 4096)                 a JSON header, padded with spaces: format, version, the key it was built
                              for, the layer indices in file order, the layout of one region
    [4096 + k * region, ...)  layer k's region: its tensors at the layout's offsets, zero padding to a
                              multiple of 4096 (O_DIRECT wants offsets, lengths and addresses aligned)

Every decoder layer of a model has the same tensors, so one layout serves all regions. A pack is
reused when its header's key equals the one wanted (the checkpoint's files with their sizes and
modification times, the dtype, the layer set): a changed checkpoint or budget writes a new pack.
It is written to a temporary file and renamed into place, so a pack that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tessera.errors import ModelLoadError

FORMAT = "tessera-layer-pack"
VERSION = 1
ALIGN = 4096  # the I/O alignment (O_DIRECT) and the header's size
TENSOR_ALIGN = 64


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Slot:
    name: str  # the parameter's name inside a DecoderLayer, e.g. "self_attn.qkv_proj.weight"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    slots: tuple[Slot, ...]
    dtype: torch.dtype
    region_bytes: int  # padded to ALIGN

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype) -> LayerLayout:
        """The layout of `layer`'s parameters (a DecoderLayer, on any device incl. meta) in `dtype`."""
        elt = torch.empty((), dtype=dtype).element_size()
        slots, at = [], 0
        for name, p in layer.named_parameters():
            n = p.numel() * elt
            slots.append(Slot(name, tuple(p.shape), at, n))
            at = _align(at + n, TENSOR_ALIGN)
        return cls(tuple(slots), dtype, _align(at, ALIGN))

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter as a view into `buf` (uint8, at least region_bytes)."""
        return {s.name: buf[s.offset:s.offset + s.nbytes].view(self.dtype).view(s.shape) for s in self.slots}

    def to_json(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "region_bytes": self.region_bytes,
                "slots": [[s.name, list(s.shape), s.offset, s.nbytes] for s in self.slots]}


def pack_key(files: list[Path], dtype: torch.dtype, layers: list[int], layout: LayerLayout) -> dict:
    """What a pack was built from: a pack is reused only for the same key."""
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    # The files by digest: a sharded checkpoint's list would not fit the header.
    files_digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return {"checkpoint": str(files[0].parent.resolve()), "files": files_digest, "dtype": str(dtype),
            "layers": list(layers), "layout": layout.to_json()}


def pack_path(directory: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return directory / f"layers-{digest}.pack"


def read_header(path: Path) -> dict | None:
    """The header of an existing pack, or None if there is none or it is not a whole pack."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(ALIGN).decode().rstrip())
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        return None
    if size != ALIGN + len(header["key"]["layers"]) * header["key"]["layout"]["region_bytes"]:
        return None
    return header


def region_offset(position: int, layout: LayerLayout) -> int:
    """The file offset of the `position`-th region."""
    return ALIGN + position * layout.region_bytes


class PackWriter:
    """Writes a pack region by region (`write(position, buf)`), to a temporary file renamed into place
    by `finish()`; `abort()` removes it."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        header = json.dumps({"format": FORMAT, "version": VERSION, "key": key}).encode()
        if len(header) > ALIGN:
            raise ModelLoadError(f"layer pack header too large ({len(header)} bytes)")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.layout_bytes = key["layout"]["region_bytes"]
        self.count = len(key["layers"])
        os.pwrite(self.fd, header.ljust(ALIGN, b" "), 0)
        os.ftruncate(self.fd, ALIGN + self.count * self.layout_bytes)
        self.written: set[int] = set()

    def write(self, position: int, buf: torch.Tensor) -> None:
        view = memoryview(buf[: self.layout_bytes].numpy())
        at, done = ALIGN + position * self.layout_bytes, 0
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
