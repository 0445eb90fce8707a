"""Causal attention over a sequence split across ranks: ring attention and TokenRing.

Each rank holds the queries, keys and values of its own tokens (any split; the engine uses the zig-zag
one, zigzag.py) and their positions; a query at position p sees keys at positions <= p. Both schedules
compute, per rank, one block of attention per step and merge the partial results by log-sum-exp with
tessera's one merge function (tessera/ops/merge.py). Communication for the next step is issued before a
step's block is computed (isend/irecv through `batch_isend_irecv`) and waited for after it, so the
transfer overlaps the compute.

- ring (Liu et al., Ring Attention): K/V travel one way round the ring; rank r computes its own queries
  against K/V block (r - s) mod N at step s. Rank r sends sum over s < N-1 of len(r - s) * 2 * Hkv * D
  elements.
- TokenRing (Wang et al., 2024, arXiv:2412.20501): the queries travel forward (rank r+1), and the partial
  result of a block, (block_out, block_lse), goes straight back to the queries' owner at the same time,
  using the other direction of the links. At step s rank r computes the queries of rank (r - s) mod N
  against its own K/V. Rank r sends sum over s < N-1 of len(r - s) * Hq * D elements of queries, and for
  s = 1..N-1 len(r - s) * Hq * (D elements + one fp32 lse) of results. With GQA the queries outweigh
  the K/V, so TokenRing moves more bytes; what it gains is both directions of every link busy at once.

`P2P` wraps the sends, counting the bytes each rank puts on the wire (bytes_sent) so that tests hold the
schedules to the formulas above (ring_bytes_sent, tokenring_bytes_sent).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tessera.ops.merge import merge_attention_states


class P2P:
    """Point-to-point transfers of one rank, issued together and counted."""

    def __init__(self, rank: int, world: int, group=None):
        self.rank, self.world, self.group = rank, world, group
        self.bytes_sent = 0
        self.sends = 0

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]):
        """Issue the sends (tensor, destination rank) and receives (buffer, source rank); returns the
        requests to wait for."""
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        for t, _ in sends:
            self.bytes_sent += t.numel() * t.element_size()
            self.sends += 1
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(requests) -> None:
        for r in requests:
            r.wait()


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [Tq, Hq, D] over k, v [Tk, Hkv, D] (GQA: Hq a multiple of Hkv), by position.
    Returns (out [Tq, Hq, D] in q's dtype, lse [Tq, Hq] fp32); a query that sees none of these keys has
    lse = -inf and out = 0."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().view(tq, hkv, g, d)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    visible = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hkv, g, Tq]
    p = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hgqk,khd->qhgd", p, v.float()).reshape(tq, hq, d)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(tq, hq).contiguous()


def ring_attention(q, k, v, positions: list[torch.Tensor], comm: P2P, scale: float) -> torch.Tensor:
    """Ring attention: this rank's queries q [T, Hq, D] against every rank's K/V, the K/V passed
    forward round the ring. positions[j]: rank j's token positions (every rank knows them all)."""
    r, n = comm.rank, comm.world
    held = torch.stack([k, v]).contiguous()  # K and V in one transfer
    out = lse = None
    for s in range(n):
        pending, nxt = [], None
        if s < n - 1:  # pass what this rank holds on, receive the next block, while computing this one
            nxt = held.new_empty((2, len(positions[(r - s - 1) % n]), *held.shape[2:]))
            pending = comm.start([(held, (r + 1) % n)], [(nxt, (r - 1) % n)])
        part = block_attention(q, held[0], held[1], positions[r], positions[(r - s) % n], scale)
        out, lse = part if s == 0 else merge_attention_states(out, lse, *part)
        comm.wait(pending)
        held = nxt
    return out


def tokenring_attention(q, k, v, positions: list[torch.Tensor], comm: P2P, scale: float) -> torch.Tensor:
    """TokenRing: the queries go forward round the ring; each block's (out, lse) goes back to the
    queries' owner directly, in the same batch of transfers as the next queries."""
    r, n = comm.rank, comm.world
    held_q = q.contiguous()
    out = lse = None
    back = None  # (packed block result, its owner) from the previous step, to send back
    for s in range(n + 1):
        sends, recvs = [], []
        nxt_q = incoming = None
        if s < n - 1:  # the queries go on to the next rank
            nxt_q = held_q.new_empty((len(positions[(r - s - 1) % n]), *q.shape[1:]))
            sends.append((held_q, (r + 1) % n))
            recvs.append((nxt_q, (r - 1) % n))
        if back is not None:  # last step's block goes back to its owner; ours, computed at step s-1 by
            sends.append(back)  # rank r+s-1, comes back from there
            incoming = _result_buffer(q)
            recvs.append((incoming, (r + s - 1) % n))
        pending = comm.start(sends, recvs)
        part = None
        if s < n:
            part = block_attention(held_q, k, v, positions[(r - s) % n], positions[r], scale)
        comm.wait(pending)
        if s == 0:
            out, lse = part
        elif part is not None:
            back = (_pack(*part), (r - s) % n)
        else:
            back = None
        if incoming is not None:
            out, lse = merge_attention_states(out, lse, *_unpack(incoming, q))
        held_q = nxt_q
    return out


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """block_out [T, H, D] (model dtype) and block_lse [T, H] (fp32) as the bytes of one buffer: one
    transfer, no widening of the output."""
    t = out.shape[0]
    return torch.cat([out.contiguous().view(t, -1).view(torch.uint8), lse.contiguous().view(torch.uint8)], dim=1)


def _result_buffer(q: torch.Tensor) -> torch.Tensor:
    t, h, d = q.shape
    return torch.empty((t, h * d * q.element_size() + h * 4), dtype=torch.uint8, device=q.device)


def _unpack(buf: torch.Tensor, q: torch.Tensor):
    t, h, d = q.shape
    cut = h * d * q.element_size()
    out = buf[:, :cut].contiguous().view(q.dtype).view(t, h, d)
    lse = buf[:, cut:].contiguous().view(torch.float32).view(t, h)
    return out, lse


def ring_bytes_sent(lengths: list[int], rank: int, num_kv_heads: int, head_dim: int, elt: int) -> int:
    """Bytes rank `rank` sends in ring_attention: the K/V of ranks r, r-1, ..., r-N+2."""
    n = len(lengths)
    return sum(lengths[(rank - s) % n] for s in range(n - 1)) * 2 * num_kv_heads * head_dim * elt


def tokenring_bytes_sent(lengths: list[int], rank: int, num_heads: int, head_dim: int, elt: int) -> int:
    """Bytes rank `rank` sends in tokenring_attention: the queries of ranks r, ..., r-N+2 forward, and
    for the queries of ranks r-1, ..., r-N+1 their block_out (elt bytes an element) and block_lse (fp32)
    back."""
    n = len(lengths)
    queries = sum(lengths[(rank - s) % n] for s in range(n - 1)) * num_heads * head_dim * elt
    results = sum(lengths[(rank - s) % n] for s in range(1, n)) * num_heads * (head_dim * elt + 4)
    return queries + results
