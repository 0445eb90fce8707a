"""The slow tier of sparse decoding when KV is offloaded: one sequence's K/V of every position, at every
sparse layer, in host memory (page-locked when the model runs on a GPU, so copies to and from the device
run asynchronously on a side stream).

Each step first spills the positions the device's paged pool gained since the last step (the prompt on
the first sparse step, then one token a step), then gathers the positions the working set lacks from
here. Positions are contiguous by index ([layer, position, head, dim]): a spill is one slice copy, a
gather one index_select into a staging buffer.

On a CPU-only machine the same path runs between two host pools (the paged pool and this store), which
is what the CPU tests cover; there it is off by default, since the paged pool already is host memory.
"""

from __future__ import annotations

import torch


class HostStore:
    """Grows by doubling. Dropped with its sequence's blocks (BlockManager.free_seq)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, pin: bool):
        self.shape = (num_layers, 0, num_kv_heads, head_dim)
        self.dtype, self.pin = dtype, pin
        self.k = self.v = torch.empty(self.shape, dtype=dtype)
        self.num_spilled = 0  # positions [0, num_spilled) hold their K/V

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int) -> None:
        """Room for n positions. Only between steps: no copy may be in flight."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity, 256)
        layers, _, hkv, d = self.shape
        k, v = (torch.empty(layers, cap, hkv, d, dtype=self.dtype, pin_memory=self.pin) for _ in range(2))
        k[:, : self.num_spilled] = self.k[:, : self.num_spilled]
        v[:, : self.num_spilled] = self.v[:, : self.num_spilled]
        self.k, self.v = k, v

    def spill(self, li: int, k_dev: torch.Tensor, v_dev: torch.Tensor, start: int) -> None:
        """Layer li's K/V [m, hkv, d] of positions [start, start + m), gathered from the paged pool.
        Asynchronous from a device (the caller synchronises its stream before anything reads them)."""
        end = start + k_dev.shape[0]
        self.k[li, start:end].copy_(k_dev, non_blocking=True)
        self.v[li, start:end].copy_(v_dev, non_blocking=True)

    def gather(self, li: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's K/V [m, hkv, d] of `positions` (a CPU index), in staging buffers that are pinned
        when this store is, so the copy to the device that follows is asynchronous."""
        m = positions.numel()
        out = [torch.empty((m, *self.shape[2:]), dtype=self.dtype, pin_memory=self.pin) for _ in range(2)]
        torch.index_select(self.k[li], 0, positions, out=out[0])
        torch.index_select(self.v[li], 0, positions, out=out[1])
        return out[0], out[1]
