"""Write a checkpoint as it is produced, a shard at a time, so converting a model never holds it whole.

Tensors are added one by one and written out whenever the pending ones reach `max_shard_bytes`; the
result is what Hugging Face writes: one `model.safetensors` when everything fit in a single shard, or
`model-00001.safetensors`, ... plus `model.safetensors.index.json` (its `weight_map` names each tensor's
file). Peak memory is one shard plus whatever the producer holds, whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ShardWriter:
    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending tensors as the next shard (a producer may call it at a natural boundary)."""
        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending and the index; returns the files written."""
        self.flush()
        if len(self.files) == 1:  # everything fit in one shard: the plain single-file layout
            (self.out_dir / self.files[0]).rename(self.out_dir / SINGLE_FILE)
            self.files = [SINGLE_FILE]
            self.weight_map = dict.fromkeys(self.weight_map, SINGLE_FILE)
            return self.files
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files + [INDEX_FILE]
