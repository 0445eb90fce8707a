"""Sequence parallelism for long prefills: a prompt's tokens split across ranks.

Every rank holds the whole model. A prompt whose prefill starts from position 0 (no cached prefix) is
split zig-zag (zigzag.py); each rank runs all layers over its own tokens, and attention between ranks
runs by ring attention or TokenRing (ring_attention.py). Each layer's K/V is gathered to rank 0, which
writes it into its paged cache; rank 0 holds the prompt's last token, so it samples the first output
token, and the decode steps that follow run on rank 0 alone over the gathered cache (as do prefill
chunks that start past 0, and prompts shorter than 2N tokens).

It plugs in as an attention backend (SequenceParallelBackend: RoPE at the global positions, the ring
schedule as `attend`, the gather as the cache write) and a runner that hands such prefills to it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tessera.distributed.ring_attention import P2P, ring_attention, tokenring_attention
from tessera.distributed.zigzag import zigzag_positions
from tessera.engine.model_runner import ModelRunner
from tessera.errors import DistributedError
from tessera.ops.attention import AttentionMetadata, write_kv
from tessera.ops.backend import TorchBackend
from tessera.ops.rope import apply_rope

SCHEDULES = {"ring": ring_attention, "tokenring": tokenring_attention}


class SequenceParallelBackend(TorchBackend):
    """The layer pieces of one sequence-parallel prefill on one rank."""

    name = "sequence-parallel"

    def __init__(self, device: torch.device, comm: P2P, positions: list[torch.Tensor], mode: str,
                 slots: torch.Tensor | None):
        super().__init__(device)
        self.comm, self.positions, self.schedule = comm, positions, SCHEDULES[mode]
        self.slots = slots  # rank 0: the cache slot of every position of the prompt

    def rope_and_cache(self, qk, v, num_heads, cos_sin, kv_cache, meta):
        qk = apply_rope(qk, *cos_sin)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        self._gather_kv(k, v, kv_cache)
        return q, k

    def attend(self, q, k, v, kv_cache, meta, scale):
        return self.schedule(q.contiguous(), k.contiguous(), v.contiguous(), self.positions, self.comm, scale)

    def decode_stack(self, model, kv_caches, meta):
        return None

    def _gather_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache) -> None:
        """Every rank's K/V of this layer into rank 0's paged cache (one padded gather)."""
        width = max(len(p) for p in self.positions)
        kv = k.new_zeros((2, width, *k.shape[1:]))
        kv[0, : len(k)], kv[1, : len(v)] = k, v
        rank, world = self.comm.rank, self.comm.world
        parts = [torch.empty_like(kv) for _ in range(world)] if rank == 0 else None
        dist.gather(kv, parts, dst=0)
        if rank == 0:
            ks = torch.cat([p[0, : len(pos)] for p, pos in zip(parts, self.positions, strict=True)])
            vs = torch.cat([p[1, : len(pos)] for p, pos in zip(parts, self.positions, strict=True)])
            write_kv(ks, vs, kv_cache[0], kv_cache[1], self.slots[torch.cat(self.positions)])


def sequence_parallel_forward(model, tokens: torch.Tensor, rank: int, world: int, mode: str,
                              kv_caches: list | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the prefill of `tokens` (the whole prompt, from position 0): the final hidden
    states of its zig-zag tokens. Rank 0 passes its KV caches and the prompt's slots."""
    positions = zigzag_positions(len(tokens), world)
    mine = positions[rank]
    dev = tokens.device
    backend = SequenceParallelBackend(dev, P2P(rank, world), positions, mode, slots)
    meta = AttentionMetadata(slot_mapping=mine, num_decode=0, backend=backend, positions=mine.to(dev))
    with torch.inference_mode():
        return model(tokens[mine.to(dev)], mine.to(dev), kv_caches or [None] * len(model.layers), meta)


class SequenceParallelRunner(ModelRunner):
    """Rank 0's runner: prefills from position 0 of at least 2N tokens are split across the ranks; the
    rest of each step (decodes, later chunks, short prompts, prompts being scored) runs here."""

    def __init__(self, ranks, model, num_blocks: int, block_size: int, device, dtype):
        super().__init__(model, num_blocks, block_size, device, dtype)
        self.ranks = ranks
        self.world = ranks.ctx.world_size
        self.mode = ranks.config.sequence_parallel_mode

    def _splits(self, item) -> bool:
        seq = item.seq
        return (seq.num_computed_tokens == 0 and item.num_new_tokens >= 2 * self.world and seq.sparse is None
                and not (seq.prompt_entropies or seq.prompt_logprobs))

    def run(self, batch, all_rows: bool = False) -> torch.Tensor:
        split = [] if all_rows else [item for item in batch if self._splits(item)]
        if not split:
            return super().run(batch, all_rows)
        parallel = {id(item) for item in split}
        rest = [item for item in batch if id(item) not in parallel]
        logits: dict[int, torch.Tensor] = {}
        if rest:
            sampled = [item for item in rest if item.samples]
            for item, row in zip(sampled, super().run(rest), strict=True):
                logits[id(item)] = row[None]
        for item in split:
            hidden = self._prefill(item)
            if item.samples:
                logits[id(item)] = self.model.compute_logits(hidden[-1:])  # rank 0 holds the last token
        rows = [logits[id(item)] for item in batch if item.samples]
        if not rows:
            return torch.empty((0, self.model.cfg.vocab_size), dtype=torch.float32, device=self.device)
        return torch.cat(rows)

    def _prefill(self, item) -> torch.Tensor:
        seq, n = item.seq, item.num_new_tokens
        self.ranks.check()
        tokens = torch.tensor(seq.token_ids[:n], dtype=torch.long)
        slots = torch.tensor(self._slots(seq.block_table, 0, n), dtype=torch.long, device=self.device)
        try:
            self.ranks.ctx.broadcast(("prefill", tokens))
            return sequence_parallel_forward(self.model, tokens.to(self.device), 0, self.world, self.mode,
                                             self.kv_caches, slots)
        except (RuntimeError, DistributedError) as e:
            raise self.ranks.fail(e) from e
