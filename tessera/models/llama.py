"""The Llama family (Llama incl. llama3 rope scaling, Mistral, Qwen2, Qwen3) over a flat paged batch.

One implementation switches on the few differences: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings. q/k/v and gate/up are fused into one matmul each; the loader fuses the HF weights.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.config import ModelConfig
from tessera.ops.attention import AttentionMetadata
from tessera.ops.linear import Linear
from tessera.ops.norm import RMSNorm
from tessera.ops.rope import cos_sin_cache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos_sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """cos_sin: whatever the step's backend gave the layers for RoPE (tessera.ops.backend)."""
        t = x.shape[0]
        ops = meta.backend
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([ops.head_norm(self.q_norm, qk[:, : self.num_heads]),
                            ops.head_norm(self.k_norm, qk[:, self.num_heads:])], dim=1)
        q, k = ops.rope_and_cache(qk, v, self.num_heads, cos_sin, kv_cache, meta)
        if meta.kv_coherence is not None:
            meta.kv_coherence(self.layer_idx, k, v, kv_cache)
        sparse = meta.sparse
        if sparse is None:
            o = ops.attend(q, k, v, kv_cache, meta, self.scale)
        elif sparse.is_sparse_layer(self.layer_idx):
            # The other rows as usual; the sparse decodes over their working sets.
            o = ops.attend(q, k, v, kv_cache, sparse.dense_meta, self.scale)
            r = sparse.rows
            if sparse.measure:
                sparse.measure_recall(self.layer_idx, q[r])
            o[r] = sparse.attend(self.layer_idx, q[r], k[r], v[r], self.scale)
        else:
            o = ops.attend(q, k, v, kv_cache, meta, self.scale)
            if self.layer_idx == sparse.retrieval_layers - 1:
                sparse.select(self.layer_idx, q[sparse.rows])
        if meta.observe is not None:
            meta.observe.record(q, kv_cache[0], self.scale)
        return self.o_proj(o.view(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        self.inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, bias=cfg.mlp_bias)
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, ops):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    # Decode steps may run these layers as one C++ stack (tessera/ops/fused_decode.py), which computes
    # exactly this forward from the weights as they are at that moment; a subclass that changes the
    # forward, or whose weights are not resident between steps, sets it False.
    fusable = True

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = self.build_mlp(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def build_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward part, called as mlp(x, ops); a mixture of experts overrides this."""
        return MLP(cfg)

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        ops = meta.backend
        if residual is None:
            residual, x = x, ops.rms_norm(self.input_layernorm, x)
        else:
            x, residual = ops.rms_norm(self.input_layernorm, x, residual)
        x = self.self_attn(x, cos_sin, kv_cache, meta)
        x, residual = ops.rms_norm(self.post_attention_layernorm, x, residual)
        return self.mlp(x, ops), residual


class LlamaForCausalLM(nn.Module):
    layer_cls: type[DecoderLayer] = DecoderLayer  # the MoE models swap in their layer (tessera/models/moe.py)

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.quantize = False  # tied to the embeddings in most small models; stays in the compute dtype
        self.tie_weights()
        self.register_buffer("cos_sin", cos_sin_cache(cfg.rope, cfg.head_dim, max_positions), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        cos_sin = meta.backend.cos_sin(self.cos_sin, positions, self.embed_tokens.weight.dtype)
        x, residual = self.embed_tokens(input_ids), None
        stack = meta.backend.decode_stack(self, kv_caches, meta)  # all layers in one call (decode steps, CPU)
        if stack is not None:
            x, residual = stack.forward(x, positions, cos_sin, meta.slot_mapping, meta.decode_block_tables,
                                        meta.decode_seq_lens)
        else:
            for layer, kv in zip(self.layers, kv_caches, strict=True):
                x, residual = layer(x, residual, cos_sin, kv, meta)
        x, _ = meta.backend.rms_norm(self.norm, x, residual)
        return x

    def tie_weights(self) -> None:
        """Tied embeddings: the LM head reads the embedding matrix (one Parameter, listed once as
        embed_tokens.weight). Moving a model to another device unties them; call this again after."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
