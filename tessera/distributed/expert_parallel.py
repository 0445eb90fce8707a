"""Expert parallelism inside the engine: each rank holds its share of every MoE layer's experts.

The ranks are the tensor-parallel ones (tessera/distributed/launch.py, worker.py): rank 0 schedules and
broadcasts each step's flat batch, every rank runs the whole step. Attention, norms, routers, dense MLPs
and the LM head are replicated (each rank keeps its own copy of the KV cache); only the experts are
split, by a `Placement` (tessera/moe/placement.py: `tessera moe-place` writes one from routing traces,
ExFlow's affinity-aware placement; round-robin when none is given). A rank keeps only the stacked
weights of its own experts. Every token is on every rank already, so an MoE layer needs no dispatch:
each rank runs the (token, expert) pairs of its experts and one all-reduce sums the partial outputs
(tessera.moe.executor.AllReduceExpertExecutor; EngineConfig.moe_dispatch = "allreduce", the default).
With attention replicated that is the least traffic any scheme can have; ExFlow's one-all-to-all scheme
pays off when attention is data-parallel (tokens live on different ranks): moe_dispatch = "exflow" or
"all-to-all" runs each token's attention on one rank and moves tokens to their experts
(tessera/moe/token_flow.py; docs/architecture.md discusses the trade).

The placement is read and checked on rank 0 before any worker starts (`engine_placement`), so a bad
file fails fast with a clear error; each worker reads the same file again when it shards its model.
"""

from __future__ import annotations

import torch

from tessera.config import EngineConfig, ModelConfig
from tessera.errors import InvalidRequestError
from tessera.moe.placement import Placement, round_robin


def sparse_layers(model_cfg: ModelConfig) -> list[int]:
    """The layer indices with an MoE block, in order: row i of a placement is the i-th of them."""
    if model_cfg.moe is None:
        raise InvalidRequestError(f"expert_parallel_size > 1 needs a mixture-of-experts model; "
                                  f"{model_cfg.architecture} has no experts")
    return [i for i in range(model_cfg.num_layers) if model_cfg.moe.is_sparse(i)]


def engine_placement(config: EngineConfig, model_cfg: ModelConfig) -> Placement:
    """The placement the engine runs: config.moe_placement's file, checked against the model and the
    rank count (layers, experts, ranks, capacity), or round-robin."""
    layers, ranks = sparse_layers(model_cfg), config.expert_parallel_size
    num_experts = model_cfg.moe.num_experts
    if ranks > num_experts:
        raise InvalidRequestError(f"expert_parallel_size {ranks} is more than the model's {num_experts} experts "
                                  "per layer")
    if config.moe_placement is None:
        return round_robin(len(layers), num_experts, ranks)
    placement = Placement.load(config.moe_placement)
    placement.check_fits(len(layers), num_experts, ranks, what=f"{model_cfg.architecture} ({model_cfg.num_layers} "
                         f"layers, {len(layers)} with experts)")
    return placement


def shard_experts(model, config: EngineConfig, rank: int, group=None):
    """Keep only rank `rank`'s experts in every MoE block of `model` and give the model the executor of
    config.moe_dispatch: all-reduce (every rank runs every token), or a scheme that moves tokens between
    ranks (exflow, all-to-all: tessera/moe/token_flow.py). Returns the executor (its `stats` count the
    bytes)."""
    from tessera.models.moe import GroupedExperts
    from tessera.models.moe_executor import set_expert_executor
    from tessera.moe.executor import AllReduceExpertExecutor
    from tessera.moe.token_flow import TokenFlowExecutor

    placement = engine_placement(config, model.cfg)
    blocks = model.moe_blocks()
    index: dict[int, torch.Tensor] = {}
    for row, block in enumerate(blocks):
        full = block.experts
        mine = torch.tensor(placement.experts_on(row, rank), dtype=torch.long, device=full.w_gate_up.device)
        local = GroupedExperts(len(mine), full.w_gate_up.shape[2], full.inter)
        local.w_gate_up = torch.nn.Parameter(full.w_gate_up.detach()[mine].contiguous(), requires_grad=False)
        local.w_down = torch.nn.Parameter(full.w_down.detach()[mine].contiguous(), requires_grad=False)
        block.experts = local  # the other ranks' experts are freed here
        lookup = torch.full((full.num_experts,), -1, dtype=torch.long, device=mine.device)
        lookup[mine] = torch.arange(len(mine), device=mine.device)
        index[block.layer_idx] = lookup
    if config.moe_dispatch == "allreduce":
        executor = AllReduceExpertExecutor(index, len(blocks), group)
    else:
        executor = TokenFlowExecutor(config.moe_dispatch, placement, index, model.cfg.num_layers, group)
    set_expert_executor(model, executor)
    return executor
