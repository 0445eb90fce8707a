"""Expert parallelism that moves tokens between ranks, in the engine: ExFlow's context-coherent scheme
(EngineConfig.moe_dispatch = "exflow") and the classic two all-to-alls with data-parallel attention
("all-to-all"). The default, "allreduce", keeps every token on every rank
(tessera.moe.executor.AllReduceExpertExecutor); tessera.moe.expert_parallel is the standalone prefill
prototype these follow, tessera.moe.traffic counts the same moves from a routing trace.

Every rank gets the whole step from rank 0 (token ids, positions, cache slots, the StepLayout: the
tensor-parallel machinery, tessera/distributed/worker.py) and has a KV cache of the same shape; each
MoE layer's experts are split by the placement (tessera/distributed/expert_parallel.py). What changes is
that each row of the step's flat batch (a token) lives on one rank at a time (`Resident`), and each
rank runs the layers for its rows only. The step runs here (`run_model`, through the model's executor
seam, `MoeForCausalLM.forward`), not block by block:

  start      sequence i of the batch starts on rank i mod R (exflow), or on its home rank (all-to-all:
             a hash of its first KV block's id; see below);
  attention  each of a rank's rows attends as a one-token decode of its sequence at its position
             (`resident_metadata`: one paged decode call for all of them, the backend's own kernels),
             its context read from the cache. exflow: once a rank's rows have
             written their new K/V, the step's new K/V rows are all-gathered and every rank writes all of
             them into its cache (`AttentionMetadata.kv_coherence`), BEFORE attention: every cache stays
             whole (ExFlow's context coherence: attention can run anywhere), and rows of one prefill chunk
             that sit on different ranks see each other's keys causally. all-to-all: a sequence never
             leaves its home at attention, so no K/V moves;
  dense MLP  where the row is (Qwen's mlp_only_layers);
  MoE        routed where the row is; one all-to-all sends [h, row, weights, expert ids] once to each
             other rank holding one of its top-k experts (h: the residual stream; the receiver applies
             the post-attention norm itself); each rank runs its experts on the rows it holds (grouped
             GEMMs, `run_local_experts`). exflow: the row's new home is its primary expert's rank (the
             residual went there); the other experts' ranks send their weighted partial there, a second
             all-to-all that top_k = 1 never needs (ExFlow's one all-to-all per layer). all-to-all:
             every partial goes back to the row's home (the second all-to-all). The shared expert
             (Qwen2-MoE) runs on the home;
  head       the rows are sent to rank 0 (the final norm, LM head and sampling run there).

all-to-all keeps a sequence's K/V only on its home, so the home must not change between steps: it is
a hash of the sequence's first KV block id (`home_rank`), fixed for the sequence's life and the same for
every sequence that reuses a cached prefix (prefix caching always shares from the first block).

Every byte that leaves a rank is counted per decoder layer (`stats`, a tessera.moe.comm.CommStats):
dispatch and combine rows, the K/V all-gather, the rows sent to rank 0 for the head; summed over the
ranks by the engine's `moe_traffic()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tessera.errors import InvalidRequestError
from tessera.models.moe import SparseMoeBlock, route
from tessera.models.moe_executor import ExpertExecutor
from tessera.moe.comm import CommStats, all_gather_rows, exchange
from tessera.moe.executor import run_local_experts
from tessera.moe.placement import Placement
from tessera.ops.attention import AttentionMetadata, write_kv
from tessera.ops.backend import StepLayout

SCHEMES = ("exflow", "all-to-all")


@dataclass
class Resident:
    """The step's rows that live on this rank: flat-batch row indices [n] (ascending) and residual [n, H]."""

    rows: torch.Tensor
    h: torch.Tensor


def as_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, m] int32 or float32 carried bit-exactly inside rows of `dtype` ([n, m * 4 / element size])."""
    return t.contiguous().view(dtype)


def from_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.contiguous().view(dtype)


def resident_metadata(layout: StepLayout, rows: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                      backend) -> AttentionMetadata:
    """Attention metadata for the step's `rows` only, each row a one-token decode of its sequence at its
    position: its context, every earlier position and itself, is in the cache by then (earlier steps, the
    rank's own new rows, and under exflow the other ranks' rows of the step, written before attention).
    One paged decode call then serves all of a rank's rows, however scattered over sequences and chunks
    the MoE layers left them (prefill runs of one or two rows as separate chunks cost a kernel call each)."""
    rows = rows.cpu()
    cu = torch.tensor(layout.cu_seqlens)
    seq = torch.searchsorted(cu, rows, right=True) - 1  # the batch entry of each row
    starts = torch.tensor(layout.starts)[seq] + rows - cu[seq]  # the row's position
    tables = [layout.block_tables[k] for k in seq.tolist()]
    sub = StepLayout(tables, starts.tolist(), [1] * len(tables), len(tables), layout.block_size, layout.null_block)
    index = rows.to(slot_mapping.device)
    meta = backend.build_metadata(sub, slot_mapping[index], positions[index])
    meta.layout = sub
    return meta


def home_rank(first_block: int, world: int) -> int:
    """all-to-all's home of a sequence: its first KV block id, hashed (Fibonacci hashing). Block ids are
    handed out in runs of a sequence's length, and a plain `id mod R` put all 32 sequences of the essay
    bench (docs/benchmarks.md) on one of 2 ranks."""
    return ((first_block * 0x9E3779B1) & 0xFFFFFFFF) * world >> 32


class TokenFlowExecutor(ExpertExecutor):
    """One rank's side of the "exflow" or "all-to-all" scheme (module docstring). `local_index[layer]`:
    global expert id -> index in this rank's `block.experts` (-1: on another rank)."""

    def __init__(self, scheme: str, placement: Placement, local_index: dict[int, torch.Tensor], num_layers: int,
                 group=None):
        if scheme not in SCHEMES:
            raise InvalidRequestError(f"unknown token-moving scheme {scheme!r}: {', '.join(SCHEMES)}")
        self.name, self.placement, self.local_index, self.group = scheme, placement, local_index, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.row_of_layer = {layer: i for i, layer in enumerate(sorted(local_index))}
        self.rank_of = torch.as_tensor(placement.rank_of)
        self.stats = CommStats(num_layers)  # indexed by decoder layer (dense layers move K/V only)
        self.tokens = 0  # rows of every step run so far (the same count on every rank)

    def __call__(self, block, x, routing, ops):
        raise RuntimeError(f"the {self.name} scheme runs whole steps (run_model), not single MoE blocks")

    # ---- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_model(self, model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                  meta: AttentionMetadata):
        """The step's final hidden states [T, H] on rank 0 (None on the other ranks)."""
        if meta.sparse is not None or meta.observe is not None:
            raise InvalidRequestError(f"sparse-attention requests do not run with moe_dispatch={self.name} yet")
        layout, ops = meta.layout, meta.backend
        self.tokens += input_ids.shape[0]
        rows = torch.nonzero(self._start_ranks(layout) == self.rank).flatten()
        res = Resident(rows, model.embed_tokens(input_ids[rows.to(input_ids.device)]))
        for layer, kv in zip(model.layers, kv_caches, strict=True):
            res.h = res.h + self._attention(model, layer, res, positions, kv, meta)
            if isinstance(layer.mlp, SparseMoeBlock):
                res = self._moe(layer.mlp, layer.post_attention_layernorm, res, ops)
            elif res.rows.numel():
                res.h = res.h + layer.mlp(ops.rms_norm(layer.post_attention_layernorm, res.h), ops)
        return self._to_head(model, res, input_ids.shape[0], ops)

    def _start_ranks(self, layout: StepLayout) -> torch.Tensor:
        """[T] the rank each row starts the step on."""
        if self.name == "all-to-all":  # the sequence's home, where its K/V is (module docstring)
            home = [home_rank(table[0], self.world) for table in layout.block_tables]
        else:
            home = [i % self.world for i in range(len(layout.q_lens))]
        return torch.repeat_interleave(torch.tensor(home, dtype=torch.long), torch.tensor(layout.q_lens))

    # ---- attention -----------------------------------------------------------------------------------
    def _attention(self, model, layer, res: Resident, positions: torch.Tensor, kv, meta: AttentionMetadata):
        ops, layer_idx = meta.backend, layer.self_attn.layer_idx
        share = self.name == "exflow"
        if not res.rows.numel():  # no rows here: still take part in the all-gather, and write the others'
            if share:
                hkv, d = kv[0].shape[-2:]
                empty = res.h.new_empty((0, hkv, d))
                self._share_kv(res.rows, meta.slot_mapping, layer_idx, empty, empty, kv)
            return res.h
        sub = resident_metadata(meta.layout, res.rows, meta.slot_mapping, positions, ops)
        if share:
            def coherence(idx, k, v, kv_cache, rows=res.rows):
                self._share_kv(rows, meta.slot_mapping, idx, k, v, kv_cache)
            sub.kv_coherence = coherence
        cos_sin = ops.cos_sin(model.cos_sin, sub.positions, model.embed_tokens.weight.dtype)
        return layer.self_attn(ops.rms_norm(layer.input_layernorm, res.h), cos_sin, kv, sub)

    def _share_kv(self, rows: torch.Tensor, slot_mapping: torch.Tensor, layer_idx: int, k: torch.Tensor,
                  v: torch.Tensor, kv_cache) -> None:
        """All-gather the step's new K/V rows ([row, k, v], rotated k) and write every rank's into this
        rank's cache (this rank's own are there already; writing them again changes nothing)."""
        n, dtype, width = k.shape[0], k.dtype, k.shape[1] * k.shape[2]
        packed = torch.cat([as_values(rows[:, None].to(torch.int32).to(k.device), dtype), k.reshape(n, width),
                            v.reshape(n, width)], 1)
        everything, sent = all_gather_rows(packed, self.group)
        self.stats.allgather_bytes[layer_idx] += sent
        tag = 4 // everything.element_size()  # columns of the row index
        where = from_values(everything[:, :tag], torch.int32)[:, 0].long()
        hkv, d = kv_cache[0].shape[-2:]
        kv_rows = everything[:, tag:].reshape(-1, 2, hkv, d)
        write_kv(kv_rows[:, 0], kv_rows[:, 1], kv_cache[0], kv_cache[1], slot_mapping[where.to(slot_mapping.device)])

    # ---- the MoE layer -------------------------------------------------------------------------------
    def _moe(self, block: SparseMoeBlock, norm, res: Resident, ops) -> Resident:
        R, me, layer_idx = self.world, self.rank, block.layer_idx
        rank_of = self.rank_of[self.row_of_layer[layer_idx]].to(res.h.device)
        (n, H), k, dtype = res.h.shape, block.moe.top_k, res.h.dtype
        if n:
            routing = route(block.gate(ops.rms_norm(norm, res.h)), block.moe, block.keep_fp32_weights)
            ids, weights = routing.topk_ids, routing.topk_weights
        else:
            ids = torch.zeros((0, k), dtype=torch.long, device=res.h.device)
            weights = torch.zeros((0, k), dtype=torch.float32 if block.keep_fp32_weights else dtype,
                                  device=res.h.device)
        w_dtype = weights.dtype
        ranks = rank_of[ids]  # [n, k]
        home = ranks[:, 0] if self.name == "exflow" else torch.full((n,), me, device=ranks.device)
        packed = torch.cat([res.h, as_values(res.rows[:, None].to(torch.int32).to(res.h.device), dtype),
                            as_values(weights.float(), dtype), as_values(ids.to(torch.int32), dtype)], 1)
        # once to each rank holding one of the row's experts, and to its home (which keeps the residual)
        got, sent = exchange([packed[(ranks == r).any(1) | (home == r)] for r in range(R)], self.group, self.stats)
        self._count(self.stats.dispatch_bytes, self.stats.dispatch_rows, layer_idx, sent, packed)
        recv = torch.cat(got)
        tag = 4 // recv.element_size()
        h_in = recv[:, :H].contiguous()
        rows_in = from_values(recv[:, H:H + tag], torch.int32)[:, 0].long()
        w_in = from_values(recv[:, H + tag:H + tag + k * tag], torch.float32).to(w_dtype)
        ids_in = from_values(recv[:, H + tag + k * tag:], torch.int32).long()
        if self.name == "exflow":
            home_in = rank_of[ids_in[:, 0]] if ids_in.numel() else ids_in.new_zeros(0)
        else:  # the rank it came from
            home_in = torch.repeat_interleave(torch.arange(R, device=recv.device),
                                              torch.tensor([len(g) for g in got], device=recv.device))
        x_in = ops.rms_norm(norm, h_in) if recv.shape[0] else h_in
        index = self.local_index[layer_idx].to(ids_in.device)
        partial = run_local_experts(block.experts, x_in, w_in, index[ids_in], ops)
        keep = home_in == me
        out = partial[keep]
        if block.shared_expert is not None and bool(keep.any()):
            x_keep = x_in[keep]
            out = out + torch.sigmoid(block.shared_expert_gate(x_keep)) * block.shared_expert(x_keep, ops)
        new_rows = rows_in[keep]
        order = torch.argsort(new_rows)
        new = Resident(new_rows[order], (h_in[keep] + out)[order])
        if self.name == "exflow" and k == 1:
            self.stats.all_to_alls[layer_idx] = 1  # nothing to send back: the row is where its expert is
            return new
        back_rows = torch.cat([partial, as_values(rows_in[:, None].to(torch.int32), dtype)], 1)
        back, sent = exchange([back_rows[(home_in == r) & ~keep] for r in range(R)], self.group, self.stats)
        self._count(self.stats.combine_bytes, self.stats.combine_rows, layer_idx, sent, back_rows)
        self.stats.all_to_alls[layer_idx] = 2
        back = torch.cat(back)
        if back.shape[0]:
            where = torch.searchsorted(new.rows, from_values(back[:, H:], torch.int32)[:, 0].long())
            new.h.index_add_(0, where, back[:, :H])
        return new

    @staticmethod
    def _count(bytes_: list[int], rows: list[int], layer_idx: int, sent: int, packed: torch.Tensor) -> None:
        bytes_[layer_idx] += sent
        rows[layer_idx] += sent // (packed.shape[1] * packed.element_size())

    # ---- the head ------------------------------------------------------------------------------------
    def _to_head(self, model, res: Resident, num_rows: int, ops):
        """Every rank's rows to rank 0, in the step's order, through the final norm."""
        dtype = res.h.dtype
        packed = torch.cat([res.h, as_values(res.rows[:, None].to(torch.int32).to(res.h.device), dtype)], 1)
        got, sent = exchange([packed if r == 0 else packed[:0] for r in range(self.world)], self.group)
        self.stats.head_bytes += sent
        if self.rank != 0:
            return None
        recv = torch.cat(got)
        H = res.h.shape[1]
        hidden = res.h.new_empty((num_rows, H))
        hidden[from_values(recv[:, H:], torch.int32)[:, 0].long()] = recv[:, :H]
        return ops.rms_norm(model.norm, hidden)


def traffic_summary(stats: CommStats, tokens: int, moe_layers: int) -> dict:
    """Bytes that crossed ranks (summed over them) per token per MoE layer, by kind, and the totals. The
    schemes' K/V and head bytes are spread over the MoE layers too, so `total` is everything a token
    costs per MoE layer."""
    kinds = {"dispatch": sum(stats.dispatch_bytes), "combine": sum(stats.combine_bytes),
             "kv": sum(stats.allgather_bytes), "reduce": sum(stats.reduce_bytes), "head": stats.head_bytes,
             "meta": stats.meta_bytes}
    per = max(tokens * moe_layers, 1)
    out = {name: value / per for name, value in kinds.items()}
    out["total"] = sum(kinds.values()) / per
    out.update(tokens=tokens, moe_layers=moe_layers, bytes=kinds,
               rows=(sum(stats.dispatch_rows) + sum(stats.combine_rows)) / per,
               dispatch_rows=list(stats.dispatch_rows), combine_rows=list(stats.combine_rows),
               kv_bytes=list(stats.allgather_bytes))
    return out
