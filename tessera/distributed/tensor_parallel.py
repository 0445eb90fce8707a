"""Tensor parallelism (Megatron-LM's layout): each rank holds a slice of every layer.

- attention: the fused q/k/v projection is column-parallel (this rank's query heads and the KV heads
  they read; with fewer KV heads than ranks each KV head is replicated on the ranks whose query heads
  use it), o_proj row-parallel;
- MLP: gate/up column-parallel, down_proj row-parallel;
- the row-parallel products are summed over ranks by one all-reduce each (AllReduceLinearMethod, put
  over whatever LinearMethod the layer multiplies with): one per attention block, one per MLP;
- embeddings, norms and the LM head stay whole on every rank; each rank's KV cache holds its own KV heads.

The slicing is done after loading (the whole checkpoint is read on each rank, then cut), which keeps the
loaders untouched; a rank briefly holds the full weights.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from tessera.errors import InvalidRequestError
from tessera.ops.linear import Linear, LinearMethod


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """Which heads rank `rank` of `world` holds."""

    q_heads: range
    kv_heads: range
    inter: range  # its slice of the MLP's intermediate dimension

    @classmethod
    def of(cls, cfg, rank: int, world: int) -> HeadSplit:
        if cfg.num_heads % world:
            raise InvalidRequestError(f"tensor_parallel_size {world} must divide the model's {cfg.num_heads} "
                                      "attention heads")
        if cfg.intermediate_size % world:
            raise InvalidRequestError(f"tensor_parallel_size {world} must divide the MLP width "
                                      f"{cfg.intermediate_size}")
        hkv = cfg.num_kv_heads
        if hkv % world and world % hkv:
            raise InvalidRequestError(f"tensor_parallel_size {world} must divide, or be a multiple of, the model's "
                                      f"{hkv} KV heads")
        lq, li = cfg.num_heads // world, cfg.intermediate_size // world
        q = range(rank * lq, (rank + 1) * lq)
        if hkv >= world:
            lkv = hkv // world
            kv = range(rank * lkv, (rank + 1) * lkv)
        else:  # replicated: the one KV head this rank's query heads share
            group = cfg.num_heads // hkv
            kv = range(q.start // group, q.start // group + 1)
        return cls(q, kv, range(rank * li, (rank + 1) * li))


def _rows(heads: range, head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + heads.start * head_dim, offset + heads.stop * head_dim)


def _cut(layer: Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
         keep_bias: bool = True) -> None:
    with torch.no_grad():
        w = layer.weight
        if rows is not None:
            w = w.index_select(0, rows.to(w.device))
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        layer.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        layer.out_features, layer.in_features = w.shape
        if layer.bias is not None:
            if not keep_bias:  # a row-parallel bias is added once, on rank 0, before the all-reduce
                layer.bias = None
            elif rows is not None:
                layer.bias = nn.Parameter(layer.bias.index_select(0, rows.to(w.device)).contiguous(),
                                          requires_grad=False)


def shard_model(model, rank: int, world: int):
    """Cut `model` (a LlamaForCausalLM) down to rank `rank`'s slice, in place; model.cfg becomes the
    rank's local shape (its head counts and MLP width), which sizes its KV cache."""
    cfg = model.cfg
    split = HeadSplit.of(cfg, rank, world)
    d, q_size, kv_size, inter = cfg.head_dim, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv_rows = torch.cat([_rows(split.q_heads, d), _rows(split.kv_heads, d, q_size),
                          _rows(split.kv_heads, d, q_size + kv_size)])
    o_cols = _rows(split.q_heads, d)
    gate_up_rows = torch.cat([torch.arange(split.inter.start, split.inter.stop),
                              torch.arange(inter + split.inter.start, inter + split.inter.stop)])
    down_cols = torch.arange(split.inter.start, split.inter.stop)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _cut(attn.qkv_proj, rows=qkv_rows)
        _cut(attn.o_proj, cols=o_cols, keep_bias=rank == 0)
        _cut(mlp.gate_up_proj, rows=gate_up_rows)
        _cut(mlp.down_proj, cols=down_cols, keep_bias=rank == 0)
        attn.num_heads, attn.num_kv_heads = len(split.q_heads), len(split.kv_heads)
        attn.q_size, attn.kv_size = len(split.q_heads) * d, len(split.kv_heads) * d
        mlp.inter = len(split.inter)
    model.cfg = dataclasses.replace(cfg, num_heads=len(split.q_heads), num_kv_heads=len(split.kv_heads),
                                    intermediate_size=len(split.inter))
    return model


class AllReduceLinearMethod(LinearMethod):
    """A row-parallel product: this rank's partial sum by `base`, then summed over the ranks. Its
    decode_op is None, so decode steps run the Python layers (the C++ decode stack has no all-reduce)."""

    def __init__(self, base: LinearMethod, group=None):
        self.base, self.group = base, group
        self.name = f"{base.name}+all-reduce"

    def process_weights(self, layer: Linear) -> None:
        self.base.process_weights(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = self.base.apply(layer, x)
        dist.all_reduce(out, group=self.group)
        return out


def reduce_row_parallel(model, group=None) -> None:
    """Put an all-reduce over o_proj and down_proj of every layer (after prepare_linears chose their
    methods)."""
    for layer in model.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.method = AllReduceLinearMethod(lin.method, group)
