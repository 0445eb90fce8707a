"""Reads a safetensors checkpoint one tensor at a time with pread, never through a memory map.

safe_open maps the whole file: every page it touches stays in the process's resident set (and in the
page cache) while the handle lives, so a model larger than the weight budget would still pass through
memory whole while it loads. Here each tensor is read into a fresh tensor, and the file range is
dropped from the page cache afterwards (POSIX_FADV_DONTNEED), so loading stays within the budget too.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.errors import ModelLoadError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies: its file, absolute byte range, dtype and shape."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def tensor_refs(path: Path) -> list[TensorRef]:
    """The tensors of one .safetensors file, in file order."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"corrupt safetensors file {path}: {e}") from e
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        refs.append(TensorRef(path, name, DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end))
    return sorted(refs, key=lambda r: r.start)


def read_tensor(fd: int, ref: TensorRef) -> torch.Tensor:
    """The tensor `ref` from the open file `fd`, read into fresh memory; its pages leave the page cache."""
    n = ref.end - ref.start
    out = torch.empty(n, dtype=torch.uint8)
    if n:
        view = memoryview(out.numpy())
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], ref.start + done)
            if got <= 0:
                raise ModelLoadError(f"{ref.path}: tensor {ref.name!r} is truncated (file ends before byte {ref.end})")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, ref.start, n, os.POSIX_FADV_DONTNEED)
    return out.view(ref.dtype).view(ref.shape)


def iter_tensors(files: list[Path], want=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor whose name `want` accepts, file by file in file order; the others
    are never read."""
    for path in files:
        refs = [r for r in tensor_refs(path) if want(r.name)]
        if not refs:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            for ref in refs:
                yield ref.name, read_tensor(fd, ref)
        except OSError as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        finally:
            os.close(fd)
