"""What each rank runs: the model prepared for its part, the runner rank 0 steps, the workers' loop.

Rank 0 sends each step to the workers over the control group (group.py): for tensor and expert
parallelism (every rank runs every step) the flat batch exactly as its runner laid it out (token ids,
positions, cache slots, the StepLayout); for sequence parallelism the prompt to prefill. The sampled
tokens come back to the workers inside the next step's token ids, so no rank but 0 keeps request state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.config import EngineConfig, ModelConfig
from tessera.distributed.expert_parallel import shard_experts
from tessera.distributed.group import DistContext
from tessera.distributed.sequence_parallel import SequenceParallelRunner, sequence_parallel_forward
from tessera.distributed.tensor_parallel import reduce_row_parallel, shard_model
from tessera.engine.model_runner import ModelRunner
from tessera.errors import DistributedError
from tessera.models.loader import load_model
from tessera.ops.linear import choose_linear_method, prepare_linears


def prepare_model(ctx: DistContext, config: EngineConfig, model):
    """Tensor parallelism: this rank's shard of the loaded model. Expert parallelism: the model with only
    this rank's experts (tessera/distributed/expert_parallel.py). Sequence parallelism: the whole model."""
    if config.tensor_parallel_size > 1:
        return shard_model(model, ctx.rank, ctx.world_size)
    if config.expert_parallel_size > 1:
        shard_experts(model, config, ctx.rank)
    return model


def runs_every_step(config: EngineConfig) -> bool:
    """Whether every rank runs every step (tensor and expert parallelism), with a KV cache of its own."""
    return config.tensor_parallel_size > 1 or config.expert_parallel_size > 1


def finish_model(config: EngineConfig, model) -> None:
    """After the runner chose the linears' methods: tensor parallelism's all-reduces go over them."""
    if config.tensor_parallel_size > 1:
        reduce_row_parallel(model)


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner when every rank runs every step (tensor or expert parallelism): each step's flat
    batch goes to the workers first."""

    def __init__(self, ranks, model, num_blocks: int, block_size: int, device, dtype):
        super().__init__(model, num_blocks, block_size, device, dtype)
        finish_model(ranks.config, model)
        self.ranks = ranks

    def forward(self, ids, pos, meta):
        self.ranks.check()
        try:
            self.ranks.ctx.broadcast(("step", ids.cpu(), pos.cpu(), meta.slot_mapping.cpu(), meta.layout))
            return super().forward(ids, pos, meta)
        except (RuntimeError, DistributedError) as e:
            raise self.ranks.fail(e) from e


def build_runner(ranks, config: EngineConfig, model, num_blocks: int, dtype: torch.dtype) -> ModelRunner:
    cls = TensorParallelRunner if runs_every_step(config) else SequenceParallelRunner
    return cls(ranks, model, num_blocks, config.block_size, ranks.ctx.device, dtype)


def serve(ctx: DistContext, config: EngineConfig, model_path: Path, max_model_len: int) -> None:
    """A worker: load, then run what rank 0 sends until it says stop."""
    device = ctx.device
    dtype = config.resolve_dtype(device)
    model = load_model(Path(model_path), ModelConfig.from_dir(model_path), max_model_len, device, dtype,
                       progress=False)
    model = prepare_model(ctx, config, model)
    msg = ctx.broadcast()
    if msg[0] == "stop":
        return
    runner = None
    if runs_every_step(config):  # the same KV cache shape and block count as rank 0's
        runner = ModelRunner(model, msg[1], config.block_size, device, dtype)
        finish_model(config, model)
    else:  # no cache here: this rank's K/V goes to rank 0
        prepare_linears(model, choose_linear_method(device, dtype))
    while True:
        msg = ctx.broadcast()
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "step" and runner is not None:
                ids, pos, slots, layout = (m.to(device) if isinstance(m, torch.Tensor) else m for m in msg[1:])
                meta = runner.backend.build_metadata(layout, slots, pos)
                meta.layout = layout  # what a token-moving expert-parallel step cuts per rank
                with torch.inference_mode():
                    runner.forward(ids, pos, meta)
            elif msg[0] == "traffic":  # rank 0 sums every rank's counted bytes (EngineRanks.moe_traffic)
                model.executor.stats.summed()
            elif msg[0] == "prefill":
                sequence_parallel_forward(model, msg[1].to(device), ctx.rank, ctx.world_size,
                                          config.sequence_parallel_mode)
            else:
                raise DistributedError(f"rank {ctx.rank}: unexpected message {msg[0]!r} from rank 0")
        except RuntimeError as e:  # a collective failed: another rank is gone
            raise DistributedError(f"rank {ctx.rank}: a collective failed ({e}); exiting") from e
