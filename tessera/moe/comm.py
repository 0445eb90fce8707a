"""The collectives expert parallelism uses, with the bytes they move counted.

`exchange` is one all-to-all of variable-length row blocks (torch.distributed.all_to_all_single, which
gloo supports on CPU and NCCL on GPU), preceded by the usual exchange of block lengths (R integers per
rank, counted apart as metadata). Only bytes that leave their rank count as traffic; the block a rank
sends to itself is a local copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks, per MoE layer and phase; rows = hidden-state rows."""

    num_layers: int
    dispatch_bytes: list[int] = field(default_factory=list)
    combine_bytes: list[int] = field(default_factory=list)
    dispatch_rows: list[int] = field(default_factory=list)
    combine_rows: list[int] = field(default_factory=list)
    all_to_alls: list[int] = field(default_factory=list)  # collectives carrying rows, per layer
    allgather_bytes: list[int] = field(default_factory=list)  # context coherence (K/V), per layer
    reduce_bytes: list[int] = field(default_factory=list)  # all-reduce of the expert outputs, per layer
    meta_bytes: int = 0
    head_bytes: int = 0  # the engine's token-moving schemes: final rows sent to rank 0 for the LM head

    def __post_init__(self):
        for name in ("dispatch_bytes", "combine_bytes", "dispatch_rows", "combine_rows", "all_to_alls",
                     "allgather_bytes", "reduce_bytes"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_layers)

    def summed(self, group=None) -> CommStats:
        """The totals over all ranks (an all_reduce; every rank gets them)."""
        fields = [self.dispatch_bytes, self.combine_bytes, self.dispatch_rows, self.combine_rows,
                  self.allgather_bytes, self.reduce_bytes]
        t = torch.tensor([v for f in fields for v in f] + [self.meta_bytes, self.head_bytes], dtype=torch.int64)
        dist.all_reduce(t, group=group)
        vals = t.tolist()
        L = self.num_layers
        parts = [vals[i * L:(i + 1) * L] for i in range(len(fields))]
        return CommStats(L, *parts[:4], all_to_alls=list(self.all_to_alls), allgather_bytes=parts[4],
                         reduce_bytes=parts[5], meta_bytes=vals[-2], head_bytes=vals[-1])


def exchange(blocks: list[torch.Tensor], group=None, stats: CommStats | None = None) -> tuple[list[torch.Tensor], int]:
    """Send blocks[r] ([n_r, W] rows, same W and dtype everywhere) to rank r; returns the blocks received
    from each rank and the bytes this rank sent off-rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    width = blocks[0].shape[1]
    # The counts live beside the data: NCCL exchanges only device tensors, gloo only host ones.
    send_counts = torch.tensor([b.shape[0] for b in blocks], dtype=torch.int64, device=blocks[0].device)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    if stats is not None:
        stats.meta_bytes += (world - 1) * send_counts.element_size()
    send = torch.cat(blocks).contiguous()
    recv = send.new_empty((int(recv_counts.sum()), width))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=send_counts.tolist(), group=group)
    off_rank_rows = int(send_counts.sum() - send_counts[rank])
    return list(recv.split(recv_counts.tolist())), off_rank_rows * width * send.element_size()


def all_gather_rows(rows: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Every rank's [n_r, W] rows, concatenated in rank order (padded all_gather; gloo has no uneven
    all_gather); returns them and the bytes this rank sent to the others."""
    world = dist.get_world_size(group)
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[:rows.shape[0]] = rows
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    sent = (world - 1) * rows.numel() * rows.element_size()
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]), sent
