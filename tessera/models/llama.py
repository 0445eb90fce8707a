"""The Llama family (Llama incl. llama3 rope scaling, Mistral, Qwen2, Qwen3) over a flat paged batch.

One implementation switches on the few differences: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings. q/k/v and gate/up are fused into one matmul each; the loader fuses the HF weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import ModelConfig
from tessera.ops.attention import AttentionMetadata, paged_attention
from tessera.ops.norm import RMSNorm
from tessera.ops.rope import apply_rope, cos_sin_cache

try:
    from tessera.ops.triton import fused_rope_and_cache_write
except ImportError:  # no triton: only the torch backend exists
    fused_rope_and_cache_write = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos_sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """cos_sin: (cos, sin) of the batch's positions for the torch path; the whole table for triton."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k go through RoPE together: half the elementwise ops of rotating them one by one.
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1)
        written = meta.backend == "triton"
        if written:
            # One kernel rotates q and k in place and writes k, v into the paged cache.
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
            fused_rope_and_cache_write(q, k, v, meta.positions, cos_sin, kv_cache[0], kv_cache[1],
                                       meta.slot_mapping)
        else:
            qk = apply_rope(qk, *cos_sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        sparse = meta.sparse
        if sparse is None:
            o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kv_written=written)
        elif sparse.is_sparse_layer(self.layer_idx):
            # The other rows as usual (this also writes every new K/V to the paged pool); the sparse
            # decodes over their working sets.
            o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], sparse.dense_meta, self.scale, kv_written=written)
            r = sparse.rows
            if sparse.measure:
                sparse.measure_recall(self.layer_idx, q[r])
            o[r] = sparse.attend(self.layer_idx, q[r], k[r], v[r], self.scale)
        else:
            o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kv_written=written)
            if self.layer_idx == sparse.retrieval_layers - 1:
                sparse.select(self.layer_idx, q[sparse.rows])
        if meta.observe is not None:
            meta.observe.record(q, kv_cache[0], self.scale)
        return self.o_proj(o.view(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos_sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", cos_sin_cache(cfg.rope, cfg.head_dim, max_positions), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        if meta.backend == "triton":
            cos_sin = self.cos_sin
        else:
            cos_sin = self.cos_sin[positions].to(self.embed_tokens.weight.dtype).unsqueeze(1).chunk(2, dim=-1)
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos_sin, kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
