"""Expert parallelism over torch.distributed (gloo on CPU): a Qwen3-MoE forward (prefill of a batch of
sequences) with the experts spread over ranks by a `Placement` and the attention replicated.

Every rank runs the attention, norms, routers and head (replicated) and only its own experts (it loads
the whole HF checkpoint and keeps references to its experts' weights; a sharded loader would read only
those). Sequence s starts on rank s % R. Each MoE layer:

  dispatch  one all-to-all: a token's row [h, token index, weights, expert ids] goes once to every other
            rank holding one of its top-k experts (h is the residual stream; the receiver applies the
            replicated post-attention norm);
  experts   each rank runs its experts on the rows it holds and sums a token's local experts;
  combine   two-a2a: every partial goes back to the token's rank (the second all-to-all);
            exflow:  the token now lives on its primary expert's rank; only secondaries off that rank
            send a partial there (no collective at all when top_k == 1: one all-to-all per layer).

Under exflow a sequence's tokens end up on several ranks, so attention needs the context of the whole
sequence: ExFlow's context coherence, done here with an all-gather of each layer's keys and values (the
bytes are counted apart from the all-to-alls), or with kv_mode="needed" by sending a token's keys and
values only to the ranks that hold a later token of its sequence (causal attention needs no more; the
ranks first all-gather which tokens each holds, a few bytes per token, counted as metadata). `home`
(tessera.moe.traffic.AffinityHome) picks where a top-k>1 token lives after a layer among its experts'
ranks (default: the primary's). The two-a2a scheme keeps whole sequences on one rank and needs no K/V
traffic. The HF model supplies the weights; its own forward is the single-process reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.errors import InvalidRequestError
from tessera.moe.comm import CommStats, all_gather_rows, exchange
from tessera.moe.placement import Placement
from tessera.moe.traffic import SCHEMES


@dataclass
class Resident:
    """The tokens this rank holds: global token indices [n] and their residual stream [n, H]."""

    idx: torch.Tensor
    h: torch.Tensor


def check_placement(placement: Placement, config, world: int) -> None:
    """A placement fits a model config (layers x experts) and a group size, or a clear error."""
    if placement.num_ranks != world:
        raise InvalidRequestError(f"placement is for {placement.num_ranks} ranks, the group has {world}")
    shape = (config.num_hidden_layers, config.num_experts)
    if placement.rank_of.shape != shape:
        raise InvalidRequestError(f"placement {placement.rank_of.shape} does not fit the model "
                                  f"({shape[0]} MoE layers x {shape[1]} experts)")


class ExpertParallelQwen3Moe:
    def __init__(self, hf_model, placement: Placement, scheme: str, group=None, home=None,
                 kv_mode: str = "all-gather"):
        if scheme not in SCHEMES:
            raise InvalidRequestError(f"unknown scheme {scheme!r}: {', '.join(SCHEMES)}")
        if kv_mode not in ("all-gather", "needed"):
            raise InvalidRequestError(f"kv_mode must be all-gather or needed, got {kv_mode!r}")
        self.model, self.scheme, self.group = hf_model.eval(), scheme, group
        self.home, self.kv_mode = home, kv_mode
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        layers = self.model.model.layers
        check_placement(placement, self.model.config, self.world)
        self.rank_of = torch.as_tensor(placement.rank_of)
        self.top_k = layers[0].mlp.gate.top_k
        # this rank's experts only: {expert id: (gate_up [2F, H], down [H, F])} per layer
        self.local = [{e: (layer.mlp.experts.gate_up_proj[e].detach(), layer.mlp.experts.down_proj[e].detach())
                       for e in placement.experts_on(i, self.rank)} for i, layer in enumerate(layers)]
        self.stats = CommStats(len(layers))

    # ---- attention (replicated weights) -------------------------------------------------------------
    def _attention(self, attn, x: torch.Tensor, res: Resident, seq_of: torch.Tensor, pos_of: torch.Tensor,
                   layer: int) -> torch.Tensor:
        n, d = x.shape[0], attn.head_dim
        heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        q = attn.q_norm(attn.q_proj(x).view(n, heads, d))  # explicit head counts: n may be 0
        k = attn.k_norm(attn.k_proj(x).view(n, kv_heads, d))
        v = attn.v_proj(x).view(n, kv_heads, d)
        cos, sin = self.model.model.rotary_emb(x, pos_of[res.idx][None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        key_idx, kk, vv = res.idx, k, v
        if self.scheme == "exflow":  # context coherence: the ranks see the keys and values they need
            width = kv_heads * d
            packed = torch.cat([res.idx[:, None].to(x.dtype), k.reshape(n, width), v.reshape(n, width)], 1)
            if self.kv_mode == "all-gather":
                everything, sent = all_gather_rows(packed, self.group)
            else:
                everything, sent = self._send_needed_kv(packed, res, seq_of)
            self.stats.allgather_bytes[layer] += sent
            key_idx = everything[:, 0].long()
            kv = everything[:, 1:].view(everything.shape[0], 2, kv_heads, d)
            kk, vv = kv[:, 0], kv[:, 1]
        if n == 0:
            return x
        mask = (seq_of[res.idx][:, None] == seq_of[key_idx][None, :]) & (
            pos_of[key_idx][None, :] <= pos_of[res.idx][:, None])
        groups = q.shape[1] // kk.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), kk.repeat_interleave(groups, 1).transpose(0, 1),
            vv.repeat_interleave(groups, 1).transpose(0, 1), attn_mask=mask[None], scale=attn.scaling)
        return attn.o_proj(out.transpose(0, 1).reshape(n, -1))

    def _send_needed_kv(self, packed: torch.Tensor, res: Resident, seq_of: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each resident token's [idx, k, v] row to the ranks holding a later token of its sequence; returns
        this rank's own rows and those received, and the bytes sent off-rank."""
        where = torch.stack([res.idx, torch.full_like(res.idx, self.rank)], 1)
        everyone, meta = all_gather_rows(where, self.group)  # which rank holds which token
        self.stats.meta_bytes += meta
        tok, owner = everyone[:, 0], everyone[:, 1]
        num_seqs = int(seq_of.max()) + 1
        last = torch.full((self.world * num_seqs,), -1, dtype=torch.long)  # latest token per (rank, sequence)
        last = last.scatter_reduce(0, owner * num_seqs + seq_of[tok], tok, reduce="amax").view(self.world, num_seqs)
        needs = last[:, seq_of[res.idx]] > res.idx[None]  # [R, n]: rank q runs a later token of t's sequence
        blocks = [packed[needs[q]] if q != self.rank else packed[:0] for q in range(self.world)]
        got, sent = exchange(blocks, self.group, self.stats)
        return torch.cat([packed, *got]), sent

    # ---- the MoE layer ------------------------------------------------------------------------------
    def _experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over the token's experts held here of weight * expert(x): [n, H]."""
        out = torch.zeros_like(x)
        for e, (gate_up, down) in self.local[layer].items():
            token, slot = torch.where(ids == e)
            if token.numel():
                g, u = F.linear(x[token], gate_up).chunk(2, dim=-1)
                y = F.linear(F.silu(g) * u, down) * weights[token, slot, None]
                out.index_add_(0, token, y)
        return out

    def _moe(self, block, norm, res: Resident, layer: int) -> Resident:
        H, k, R = res.h.shape[1], self.top_k, self.world
        _, weights, ids = block.gate(norm(res.h))
        ranks = self.rank_of[layer][ids]  # [n, k]
        row = torch.cat([res.h, res.idx[:, None].to(res.h.dtype), weights.to(res.h.dtype), ids.to(res.h.dtype)], 1)
        blocks = [row[(ranks == r).any(1)] for r in range(R)]  # once per destination rank
        if self.scheme == "two-a2a":
            blocks[self.rank] = row  # the token's residual stays home whether or not an expert is here
        got, sent = exchange(blocks, self.group, self.stats)
        self.stats.dispatch_bytes[layer] += sent
        self.stats.dispatch_rows[layer] += sent // (row.shape[1] * row.element_size())
        recv = torch.cat(got)
        h_in, t_idx = recv[:, :H], recv[:, H].long()
        w_in, ids_in = recv[:, H + 1:H + 1 + k], recv[:, H + 1 + k:].long()
        partial = self._experts(layer, norm(h_in), w_in, ids_in)
        if self.scheme == "two-a2a":
            dest = torch.cat([torch.full((len(g),), r, dtype=torch.long) for r, g in enumerate(got)])
        elif self.home is None:  # the token's new home: its primary expert's rank
            dest = self.rank_of[layer][ids_in[:, 0]]
        else:  # or the one of its experts' ranks that the next layer's experts favour
            dest = torch.as_tensor(self.home.choose(layer, ids_in.numpy(), self.rank_of[layer][ids_in].numpy()))
        # the rows whose home is this rank carry the token's residual; the others only a partial
        keep = dest == self.rank
        out = torch.cat([partial, t_idx[:, None].to(partial.dtype)], 1)
        self.stats.all_to_alls[layer] = 1
        if not (self.scheme == "exflow" and k == 1):
            back, sent = exchange([out[(dest == r) & ~keep] for r in range(R)], self.group, self.stats)
            self.stats.combine_bytes[layer] += sent
            self.stats.combine_rows[layer] += sent // (out.shape[1] * out.element_size())
            self.stats.all_to_alls[layer] = 2
            back = torch.cat(back)
        else:
            back = out[:0]
        mine_idx = t_idx[keep]
        order = torch.argsort(mine_idx)
        new = Resident(mine_idx[order], (h_in[keep] + partial[keep])[order])
        if back.shape[0]:
            pos = torch.searchsorted(new.idx, back[:, H].long())
            new.h.index_add_(0, pos, back[:, :H])
        return new

    # ---- the whole forward --------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits [sum of lengths, V] of every sequence (concatenated), the same on every rank."""
        lengths = torch.tensor([len(s) for s in sequences])
        seq_of = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos_of = torch.arange(len(seq_of)) - starts[seq_of]
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
        idx = torch.nonzero(seq_of % self.world == self.rank).flatten()
        res = Resident(idx, self.model.model.embed_tokens(flat[idx]))
        for layer, dec in enumerate(self.model.model.layers):
            res.h = res.h + self._attention(dec.self_attn, dec.input_layernorm(res.h), res, seq_of, pos_of, layer)
            res = self._moe(dec.mlp, dec.post_attention_layernorm, res, layer)
        logits = self.model.lm_head(self.model.model.norm(res.h))
        rows, _ = all_gather_rows(torch.cat([res.idx[:, None].to(logits.dtype), logits], 1), self.group)
        out = torch.empty(len(flat), logits.shape[1], dtype=logits.dtype)
        out[rows[:, 0].long()] = rows[:, 1:]
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def run_rank(rank: int, world: int, jobs: list[tuple], sequences: list[list[int]],
             batch: int | None = None, logits: bool = True) -> list[dict]:
    """One rank of `tessera.moe.launch.run_ranks`: for each (model_dir, placement, scheme[, options])
    job (options: ExpertParallelQwen3Moe's home and kv_mode), the expert-parallel logits (rank 0 only, if
    `logits`) and the traffic summed over ranks; sequences run `batch` at a time (the traffic adds up
    over the batches)."""
    from transformers import AutoModelForCausalLM

    results, models = [], {}
    step = batch or len(sequences)
    for model_dir, placement, scheme, *options in jobs:
        if model_dir not in models:
            models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ep = ExpertParallelQwen3Moe(models[model_dir], placement, scheme, **(options[0] if options else {}))
        out = [ep.forward(sequences[i:i + step]) for i in range(0, len(sequences), step)]
        results.append({"logits": torch.cat(out) if rank == 0 and logits else None, "stats": ep.stats.summed()})
    return results
