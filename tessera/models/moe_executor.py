"""How a mixture-of-experts layer runs its experts: route → dispatch → grouped experts → combine.

`SparseMoeBlock` (tessera/models/moe.py) routes each token to its top-k experts (a `Routing`) and hands
the rest to its `executor`, an `ExpertExecutor`. The default, `LocalExpertExecutor`, runs every expert
in this process:

1. dispatch: the T*k (token, expert) pairs sorted by expert (`sort_by_expert`), the token rows gathered
   in that order, and per-expert row counts as cumulative `offsets`;
2. grouped experts: `GroupedExperts.forward(rows, offsets, ops)` — two grouped GEMMs over the sorted
   rows (gate/up, then down; `ops.grouped_gemm`: torch's grouped mm on CPU, a Triton kernel on GPU)
   with SiLU-and-mul between them, never a Python loop over tokens or experts;
3. combine: each pair's output scaled by its routing weight and summed back into its token's row.

Plugging in expert parallelism (tessera's ExFlow work, issue 20 part B): write a subclass of
`ExpertExecutor` that owns the rank's experts and the process group, and set it on every MoE block
with `set_expert_executor(model, executor)` (or per layer: `block.executor = ...`, `block.layer_idx`
says which layer). Its `__call__` receives the block, the [T, H] hidden rows of this rank and their
`Routing` (global expert ids); it returns the [T, H] combined expert output for those same rows
(weighted by `routing.topk_weights`; the shared expert, if any, is added by the block afterwards).
Typically it reuses the pieces here: `sort_by_expert` to group pairs by destination rank (ranks own
contiguous or placed sets of experts; a placement is a map global expert id → (rank, local index)),
an all-to-all of the rows and their local expert ids, `GroupedExperts.forward` over the rank's own
stacked weights (slice `w_gate_up` / `w_down` [E, ...] to the local experts, in local order), the
reverse all-to-all, then `combine`. ExFlow's variant keeps tokens where their experts are and returns
them only once per layer; it can override `__call__` entirely: the block depends on nothing else.
Routing traces (which experts each token takes in each layer) come the same way: an executor that
records `routing.topk_ids` per `block.layer_idx` and then runs the local path (see tests/models/test_moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Where each of T tokens goes: its top-k expert ids (global, int64) and their weights."""

    topk_ids: torch.Tensor  # [T, k]
    topk_weights: torch.Tensor  # [T, k], float32 or the model dtype (as the model's router defines it)


@dataclass
class SortedTokens:
    """The T*k (token, expert) pairs in expert order: what the grouped GEMM reads."""

    order: torch.Tensor  # [T*k] int64: position in the flat [T*k] pair list of each sorted row
    token_of_row: torch.Tensor  # [T*k] int64: the token each sorted row belongs to
    offsets: torch.Tensor  # [E] int32: cumulative row counts (end of each expert's rows)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> SortedTokens:
    """Group the (token, expert) pairs by expert with one stable sort (ties keep token order)."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return SortedTokens(order, order // topk_ids.shape[1], torch.cumsum(counts, 0).to(torch.int32))


def combine(expert_out: torch.Tensor, sorted_tokens: SortedTokens, routing: Routing) -> torch.Tensor:
    """[T*k, H] outputs in expert order → [T, H]: each scaled by its routing weight, summed per token."""
    t, k = routing.topk_ids.shape
    weights = routing.topk_weights.reshape(-1)[sorted_tokens.order, None]
    scaled = (expert_out * weights).to(expert_out.dtype)
    pairs = torch.empty_like(scaled)
    pairs[sorted_tokens.order] = scaled  # back to [token, slot] order
    return pairs.view(t, k, expert_out.shape[-1]).sum(dim=1)  # explicit H: a rank may have no rows


class ExpertExecutor:
    """Runs a block's experts on its routed tokens. The base class is the local, single-process one."""

    name = "local"

    def __call__(self, block, x: torch.Tensor, routing: Routing, ops) -> torch.Tensor:
        experts = block.experts
        sorted_tokens = sort_by_expert(routing.topk_ids, experts.num_experts)
        rows = x[sorted_tokens.token_of_row]
        out = experts(rows, sorted_tokens.offsets, ops)
        return combine(out, sorted_tokens, routing)

    def run_model(self, model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta):
        """One step of the whole MoE model (`MoeForCausalLM.forward` calls this): the model's own layer loop,
        which calls the executor per block. A scheme that moves tokens between ranks overrides it."""
        return model.forward_layers(input_ids, positions, kv_caches, meta)


LocalExpertExecutor = ExpertExecutor
LOCAL_EXECUTOR = ExpertExecutor()


def set_expert_executor(model: torch.nn.Module, executor: ExpertExecutor) -> int:
    """Give every MoE block of `model` (and the model's step, `run_model`) the executor; returns how many
    blocks took it."""
    blocks = [m for m in model.modules() if hasattr(m, "executor") and hasattr(m, "experts")]
    for block in blocks:
        block.executor = executor
    if hasattr(model, "executor"):
        model.executor = executor
    return len(blocks)
