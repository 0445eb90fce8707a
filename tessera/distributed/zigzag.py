"""The zig-zag split of a causal sequence over N ranks.

The sequence is cut into 2N chunks as equal as the length allows (the first L mod 2N one token longer);
rank r takes chunks r and 2N-1-r. Under a causal mask the work of a query grows with its position, so
pairing an early chunk with a late one gives every rank about the same work. Rank 0 holds the last
chunk, hence the prompt's last token, whose logits the engine samples from.
"""

from __future__ import annotations

import torch


def chunk_bounds(length: int, world: int) -> list[tuple[int, int]]:
    """The 2N (start, end) chunks of a sequence of `length` tokens."""
    n = 2 * world
    base, extra = divmod(length, n)
    bounds, start = [], 0
    for c in range(n):
        end = start + base + (c < extra)
        bounds.append((start, end))
        start = end
    return bounds


def zigzag_positions(length: int, world: int) -> list[torch.Tensor]:
    """Each rank's token positions (int64, ascending): chunks r and 2N-1-r."""
    bounds = chunk_bounds(length, world)
    return [torch.cat([torch.arange(*bounds[r]), torch.arange(*bounds[2 * world - 1 - r])]) for r in range(world)]


def zigzag_lengths(length: int, world: int) -> list[int]:
    b = chunk_bounds(length, world)
    return [b[r][1] - b[r][0] + b[2 * world - 1 - r][1] - b[2 * world - 1 - r][0] for r in range(world)]
