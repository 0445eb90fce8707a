"""Expert parallelism through the MoE block's executor seam (tessera/models/moe_executor.py): the usual
two all-to-alls, with the experts spread over ranks by a `Placement` (round-robin or ExFlow's).

Each rank runs its own tokens' attention (data parallel, weights replicated) and calls every MoE block
with its rows; `AllToAllExpertExecutor` sends each row once to every rank holding one of its experts
(one all-to-all), runs this rank's experts as grouped GEMMs over the rows it received (sorted by local
expert, `GroupedExperts.forward` on the local slice of the stacked weights), and sends the weighted
partial sums back (the second all-to-all), where they are added per token. All ranks must call every
sparse layer together, with zero rows when they have none (a collective waits for every rank).

ExFlow's stay-on-the-expert's-rank variant changes where tokens live between layers, which a per-block
executor cannot express (the block returns the rows it was given): it runs at the model level in
tessera.moe.expert_parallel."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tessera.models.moe import GroupedExperts
from tessera.models.moe_executor import ExpertExecutor, Routing, combine, sort_by_expert
from tessera.moe.comm import CommStats, exchange
from tessera.moe.placement import Placement


class AllToAllExpertExecutor(ExpertExecutor):
    name = "all-to-all"

    def __init__(self, placement: Placement, sparse_layers: list[int], group=None):
        """`sparse_layers`: the model's layer indices with an MoE block, in order (row i of the placement
        is the i-th of them)."""
        self.placement, self.group = placement, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if placement.num_ranks != self.world or placement.num_layers != len(sparse_layers):
            raise ValueError(f"placement {placement.rank_of.shape} on {placement.num_ranks} ranks does not fit "
                             f"{len(sparse_layers)} MoE layers on {self.world} ranks")
        self.row_of_layer = {layer: i for i, layer in enumerate(sparse_layers)}
        self.rank_of = torch.as_tensor(placement.rank_of)
        self.stats = CommStats(len(sparse_layers))
        self._local: dict[int, tuple[GroupedExperts, torch.Tensor]] = {}

    def local_experts(self, block) -> tuple[GroupedExperts, torch.Tensor]:
        """This rank's experts of `block` as their own stacked weights, and global id -> local index (-1:
        elsewhere). A slice of the replicated weights here; a sharded loader would read only these."""
        if block.layer_idx not in self._local:
            row = self.row_of_layer[block.layer_idx]
            mine = torch.tensor(self.placement.experts_on(row, self.rank), dtype=torch.long)
            full = block.experts
            local = GroupedExperts(len(mine), full.w_gate_up.shape[2], full.inter)
            local.w_gate_up = torch.nn.Parameter(full.w_gate_up.detach()[mine], requires_grad=False)
            local.w_down = torch.nn.Parameter(full.w_down.detach()[mine], requires_grad=False)
            index = torch.full((full.num_experts,), -1, dtype=torch.long)
            index[mine] = torch.arange(len(mine))
            self._local[block.layer_idx] = (local, index)
        return self._local[block.layer_idx]

    def __call__(self, block, x: torch.Tensor, routing: Routing, ops) -> torch.Tensor:
        row = self.row_of_layer[block.layer_idx]
        T, H = x.shape
        k = routing.topk_ids.shape[1]
        ranks = self.rank_of[row][routing.topk_ids]  # [T, k]
        packed = torch.cat([x, routing.topk_weights.to(x.dtype), routing.topk_ids.to(x.dtype)], 1)
        sent_tokens = [torch.nonzero((ranks == r).any(1)).flatten() for r in range(self.world)]
        got, sent = exchange([packed[t] for t in sent_tokens], self.group, self.stats)
        self.stats.dispatch_bytes[row] += sent
        self.stats.dispatch_rows[row] += sent // (packed.shape[1] * packed.element_size())
        recv = torch.cat(got)
        partial = self._run_local(block, recv[:, :H], recv[:, H:H + k], recv[:, H + k:].long(), ops)
        back, sent = exchange(list(partial.split([len(g) for g in got])), self.group, self.stats)
        self.stats.combine_bytes[row] += sent
        self.stats.combine_rows[row] += sent // (H * partial.element_size())
        self.stats.all_to_alls[row] = 2
        out = torch.zeros_like(x)
        for tokens, part in zip(sent_tokens, back, strict=True):
            out.index_add_(0, tokens, part)
        return out

    def _run_local(self, block, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, ops) -> torch.Tensor:
        local, index = self.local_experts(block)
        return run_local_experts(local, x, weights, index[ids], ops)


def run_local_experts(local: GroupedExperts, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor,
                      ops) -> torch.Tensor:
    """Rows [n, H] through this rank's experts (grouped GEMMs): local_ids [n, k] are local expert indices,
    -1 where the expert lives elsewhere; returns each row's weighted sum over its local experts [n, H]."""
    if x.shape[0] == 0:  # no rows on this rank: nothing to compute
        return x.new_zeros(x.shape)
    here = local_ids >= 0
    # experts held elsewhere become a dummy expert with zero weight, so the grouped path stays dense
    spare = local.num_experts
    routing = Routing(torch.where(here, local_ids, spare), torch.where(here, weights, 0))
    sorted_tokens = sort_by_expert(routing.topk_ids, spare + 1)
    keep = int(sorted_tokens.offsets[spare - 1]) if spare else 0  # rows of real experts come first
    rows = x[sorted_tokens.token_of_row[:keep]]
    out = x.new_zeros((routing.topk_ids.numel(), x.shape[1]))
    if keep:
        out[:keep] = local(rows, sorted_tokens.offsets[:spare], ops)
    return combine(out, sorted_tokens, routing)


class AllReduceExpertExecutor(ExpertExecutor):
    """Expert parallelism when every rank already holds every token: the engine's ranks all run the whole
    step (attention replicated), so dispatch costs nothing. Each rank runs the (token, expert) pairs of
    the experts it holds (`block.experts` is this rank's slice, `local_index[layer]` maps global expert
    ids to it, -1 elsewhere; each pair runs on exactly one rank) and one all-reduce sums the weighted
    partial outputs: vLLM's all-gather/reduce-scatter scheme with the all-gather already done."""

    name = "all-reduce"

    def __init__(self, local_index: dict[int, torch.Tensor], num_layers: int, group=None):
        self.local_index, self.group = local_index, group
        self.world = dist.get_world_size(group)
        self.row_of_layer = {layer: i for i, layer in enumerate(sorted(local_index))}
        self.stats = CommStats(num_layers)
        self.tokens = 0  # rows run so far (counted at the first MoE layer of each step)

    def __call__(self, block, x: torch.Tensor, routing: Routing, ops) -> torch.Tensor:
        if self.row_of_layer[block.layer_idx] == 0:
            self.tokens += x.shape[0]
        index = self.local_index[block.layer_idx].to(routing.topk_ids.device)
        out = run_local_experts(block.experts, x, routing.topk_weights, index[routing.topk_ids], ops)
        dist.all_reduce(out, group=self.group)
        # a ring all-reduce sends 2 (R-1)/R of the tensor from each rank
        row = self.row_of_layer[block.layer_idx]
        self.stats.reduce_bytes[row] += 2 * (self.world - 1) * out.numel() * out.element_size() // self.world
        self.stats.all_to_alls[row] = 0
        return out
