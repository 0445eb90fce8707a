"""Mixtures of experts: Mixtral, Qwen2-MoE (with its gated shared expert) and Qwen3-MoE.

The attention, norms and paged batch are the Llama family's (tessera/models/llama.py, which already
switches on Qwen2's q/k/v bias and Qwen3's q/k norms); only the MLP differs. Each sparse layer's MLP is
a `SparseMoeBlock`: a router (`gate`, one Linear to E logits), top-k routing exactly as the model
defines it, and the experts stacked into two tensors (`GroupedExperts.w_gate_up` [E, 2F, H],
`w_down` [E, H, F]) that an `ExpertExecutor` (tessera/models/moe_executor.py: the seam where expert
parallelism plugs in) runs as grouped GEMMs over the tokens sorted by expert.

Routing (checked against transformers' MixtralTopKRouter / Qwen2MoeTopKRouter / Qwen3MoeTopKRouter):
softmax over all E logits in fp32, top-k of the probabilities, renormalised over the k when the model
says so (Mixtral always; Qwen's `norm_topk_prob`); Qwen rounds the weights back to the model dtype,
Mixtral keeps them in fp32. Qwen2-MoE adds `sigmoid(shared_expert_gate(x)) * shared_expert(x)`.
Layers listed in MoeConfig.dense_layers (Qwen's mlp_only_layers / decoder_sparse_step) keep a dense MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.config import ModelConfig, MoeConfig
from tessera.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from tessera.models.moe_executor import LOCAL_EXECUTOR, ExpertExecutor, Routing
from tessera.ops.linear import Linear


def route(logits: torch.Tensor, moe: MoeConfig, keep_fp32: bool) -> Routing:
    """Top-k routing from router logits [T, E]: softmax (fp32) → top-k → optional renormalisation."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights if keep_fp32 else weights.to(logits.dtype))


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights; forward runs them on rows already sorted by expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.inter = num_experts, intermediate_size
        # gate rows first, then up rows, as the dense MLP's fused gate_up_proj.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor, ops) -> torch.Tensor:
        """rows [M, H] sorted by expert (offsets [E]: cumulative counts, int32) → [M, H]."""
        gate_up = ops.grouped_gemm(rows, self.w_gate_up, offsets)
        return ops.grouped_gemm(ops.silu_and_mul(gate_up), self.w_down, offsets)

    def extra_repr(self) -> str:
        e, f2, h = self.w_gate_up.shape
        return f"experts={e}, hidden={h}, intermediate={f2 // 2}"


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        moe = cfg.moe
        self.moe, self.layer_idx = moe, layer_idx
        self.keep_fp32_weights = cfg.family == "mixtral"
        self.gate = Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.gate.quantize = False  # a handful of logits decide everything: keep the router exact
        self.experts = GroupedExperts(moe.num_experts, cfg.hidden_size, moe.expert_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
            self.shared_expert_gate.quantize = False
        self.executor: ExpertExecutor = LOCAL_EXECUTOR

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        routing = route(self.gate(x), self.moe, self.keep_fp32_weights)
        out = self.executor(self, x, routing, ops)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, ops)
        return out


class MoeDecoderLayer(DecoderLayer):
    fusable = False  # the C++ decode stack knows dense MLPs only; decode steps run these layers in Python

    def build_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(cfg, layer_idx) if cfg.moe.is_sparse(layer_idx) else MLP(cfg)


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: the Llama-family model with MoE decoder layers."""

    layer_cls = MoeDecoderLayer

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__(cfg, max_positions)
        # Runs each step (`ExpertExecutor.run_model`): the layer loop below by default; an expert-parallel
        # scheme that moves tokens between ranks runs its own (tessera/moe/token_flow.py).
        self.executor: ExpertExecutor = LOCAL_EXECUTOR

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        return self.executor.run_model(self, input_ids, positions, kv_caches, meta)

    def forward_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        """Every row of the step through every layer in this process (each block calls its executor)."""
        return super().forward(input_ids, positions, kv_caches, meta)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

