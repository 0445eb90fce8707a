"""CUDA graphs for decode steps (issue 22): the model's forward over a decode-only step, captured once per
batch-size bucket and replayed.

A decode step of a small model on a GPU is launch-bound: a few hundred kernels of microseconds each,
issued one by one from Python. A graph issues them all at once. It replays fixed addresses and shapes,
so every input lives in a static buffer sized for the largest bucket: token ids, positions, the slots
the new K/V go to, each row's context length and a block table as wide as the longest sequence the
engine allows. A step of n decodes runs the graph of the smallest bucket >= n, its inputs copied in and
the rows past n padded: token 0 at position 0, its K/V written to the null block (which must only hold
finite values), a context of 0 (the decode kernel reads nothing and writes 0). The decode kernel's
split count depends on shapes only (`default_num_splits`), so it is fixed per bucket too.

Only decode-only steps replay (every row a one-token dense decode, nothing observing the layers);
prefill and mixed steps run eagerly, as `enforce_eager` makes every step run. The LM head and the
sampler stay outside: they see only the rows that sample.

Without CUDA (the tests, on CPU under Triton's interpreter) capture records nothing and replay runs the
same forward on the same static buffers, padding included: everything but the capture itself is what
runs on the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tessera.engine.block_manager import NULL_BLOCK
from tessera.ops.attention import AttentionMetadata
from tessera.ops.fused_decode import has_hooks, layers_run_as_written

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (max_batch itself always included): a step
    pads to at most 15 rows, and the graphs cost a little memory each."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def unsupported_reason(runner) -> str | None:
    """Why this runner's decode steps cannot be captured, or None when they can."""
    if runner.backend.name != "triton":
        return f"the {runner.backend.name} backend (graphs capture the Triton kernels)"
    if runner.lora is not None or runner.variants is not None:
        return "LoRA and model variants hand each step's rows to their layers in Python"
    if not layers_run_as_written(runner.model.layers):
        return "layers that run Python between kernels (mixture of experts, streamed weights, module hooks)"
    if not getattr(runner.linear_method, "graph_safe", False):
        return f"the {runner.linear_method.name} linear method (not checked under capture)"
    return None


@dataclass
class _Graph:
    batch: int
    meta: AttentionMetadata  # views of the static buffers, [:batch]
    graph: object = None  # a torch.cuda.CUDAGraph, or None without CUDA
    hidden: torch.Tensor | None = None  # the captured forward's output [batch, hidden]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_model_len: int):
        self.runner = runner
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        bs = runner.block_size
        self.width = -(-max_model_len // bs)  # block-table columns: the longest sequence allowed
        dev, n = runner.device, self.max_batch
        self.null_slot = NULL_BLOCK * bs
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.null_slot, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, self.width), NULL_BLOCK, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one row per sequence
        self.layers = list(runner.model.layers)
        self.graphs: dict[int, _Graph] = {}
        self.replays = 0  # steps run from a graph (tests and logs read it)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], num_decode=b, backend=self.runner.backend,
                                 positions=self.positions[:b], cu_seqlens_q=self.cu_seqlens[: b + 1],
                                 seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_seqlen_q=1)

    def _forward(self, g: _Graph) -> torch.Tensor:
        b = g.batch
        return self.runner.model(self.ids[:b], self.positions[:b], self.runner.kv_caches, g.meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, the largest first (the smaller ones then reuse its memory pool)."""
        cuda = self.runner.device.type == "cuda"
        pool = None
        for b in reversed(self.buckets):
            g = _Graph(b, self._meta(b))
            if cuda:
                # The first run compiles and autotunes the Triton kernels: never inside a capture.
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(g)
                torch.cuda.current_stream().wait_stream(stream)
                g.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g.graph, pool=pool):
                    g.hidden = self._forward(g)
                pool = g.graph.pool()
            self.graphs[b] = g
        if cuda:
            torch.cuda.synchronize()
        log.info("CUDA graphs: decode steps of %s sequences%s", ",".join(map(str, self.buckets)),
                 "" if cuda else " (no CUDA: replayed eagerly on the static buffers)")

    def can_replay(self, ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        n = ids.shape[0]
        # A hook put on a layer after capture (a fleet instance's layer streaming) would not run in a
        # replay. Only the layers themselves are looked at here: walking every submodule each step costs
        # ~150 us, and hooks on those were refused at capture (unsupported_reason).
        return (0 < n <= self.max_batch and meta.num_decode == n and meta.sparse is None and meta.observe is None
                and meta.kv_coherence is None and meta.block_tables is not None
                and meta.block_tables.shape[1] <= self.width and not any(map(has_hooks, self.layers)))

    @torch.inference_mode()
    def replay(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The final hidden states [n, hidden] of a decode-only step (can_replay true)."""
        n = ids.shape[0]
        b = next(x for x in self.buckets if x >= n)
        w = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :w].copy_(meta.block_tables, non_blocking=True)
        # The rest of the rows' tables past w, and the padded rows, must point at the null block: a
        # previous, wider step left its blocks there (never read past seq_len, but kept harmless).
        self.block_tables[:n, w:].fill_(NULL_BLOCK)
        if b > n:
            self.ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.null_slot)
            self.seq_lens[n:b].zero_()
            self.block_tables[n:b].fill_(NULL_BLOCK)
        g = self.graphs[b]
        self.replays += 1
        if g.graph is None:
            return self._forward(g)[:n]
        g.graph.replay()
        return g.hidden[:n]
