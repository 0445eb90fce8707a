"""Paged attention over a flat ragged batch.

Layout (shared with the Triton kernels): per layer `k_cache, v_cache: [num_blocks, block_size, Hkv, D]`;
a token's slot is `block_id * block_size + offset`. The flat batch puts the single-token decode
sequences first, then the prefill chunks. A query at absolute position p attends to KV [0, p].

The CPU path never builds a mask over the whole batch. Decodes run through tessera's C++ kernel,
which reads each sequence's K/V straight from its blocks (tessera/ops/csrc); without it, as one
batched SDPA over their gathered context with a [B, 1, 1, L] padding mask. Prefill chunks attend to
their cached prefix and to themselves separately and the two partial results are merged by
log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.ops.cpu_kernels import cpu_kernels
from tessera.ops.merge import merge_attention_states


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the flat batch
    q_len: int
    seq_len: int  # KV length after this chunk (cached prefix + chunk)
    prefix_slots: torch.Tensor | None  # [seq_len - q_len] slots of the cached prefix, or None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decode: int  # the first num_decode rows are one-token decodes
    backend: object = None  # the step's tessera.ops.backend object, which runs the layer pieces
    positions: torch.Tensor | None = None  # [T] each row's position, for the RoPE kernels
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64, for the C++ kernel
    decode_seq_lens: torch.Tensor | None = None  # [B] int64
    decode_slots: torch.Tensor | None = None  # [B, L] slots of each decode's context (padded with slot 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where the slot is real
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The generic ragged description, consumed by the GPU kernels.
    cu_seqlens_q: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int = 0
    sparse: object = None  # a tessera.longctx.sparse.SparseStep when some decodes run sparse
    observe: object = None  # a tessera.longctx.sparse.PromptObserver when sparse prompts end in this step
    layout: object = None  # the tessera.ops.backend.StepLayout it was built from (parallel runners send it on)
    # Called as kv_coherence(layer_idx, k, v, kv_cache) once the rows' own new K/V are in the cache and
    # before they attend: expert parallelism's ExFlow scheme writes the other ranks' rows of the step there
    # too (tessera/moe/token_flow.py), so a row sees every earlier token of its sequence wherever it ran.
    kv_coherence: object = None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    hkv, d = k_cache.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    hkv, d = cache.shape[-2:]
    return cache.view(-1, hkv, d).index_select(0, slots.reshape(-1)).view(*slots.shape, hkv, d)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q: [H, Lq, D], k/v: [Hkv, Lk, D] (H a multiple of Hkv) -> out [Lq, H, D], lse [Lq, H]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale
    )[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def paged_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to the cache). Returns [T, Hq, D]."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd and meta.decode_slots is None:
        with torch.profiler.record_function("tessera::paged_decode_attention"):
            cpu_kernels().paged_decode_attention(out[:nd], q[:nd].contiguous(), k_cache, v_cache,
                                                 meta.decode_block_tables, meta.decode_seq_lens, scale)
    elif nd:
        # GQA without repeating K/V: the group's query heads become the "query length" axis.
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        kd = _gather(k_cache, meta.decode_slots).transpose(1, 2)
        vd = _gather(v_cache, meta.decode_slots).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        qc = q[rows].transpose(0, 1)
        # K/V keep their Hkv heads: the CPU flash kernel maps query head h to KV head h // group itself
        # (the same result as repeating them, without the two copies per chunk and layer).
        o, lse = _flash(qc, k[rows].transpose(0, 1), v[rows].transpose(0, 1), scale, causal=True)
        if chunk.prefix_slots is not None and chunk.prefix_slots.numel():
            # Every query sees the whole cached prefix (no mask), so a KV head's group of query heads
            # can be one longer query: the prefix, the long part, is read once per KV head, not repeated.
            kp = _gather(k_cache, chunk.prefix_slots).transpose(0, 1)
            vp = _gather(v_cache, chunk.prefix_slots).transpose(0, 1)
            qg = qc.reshape(num_kv_heads, group * chunk.q_len, head_dim)
            op, lsep = _flash(qg, kp, vp, scale, causal=False)  # [group * q_len, Hkv, D], [group * q_len, Hkv]
            op = op.view(group, chunk.q_len, num_kv_heads, head_dim).permute(1, 2, 0, 3).reshape(o.shape)
            lsep = lsep.view(group, chunk.q_len, num_kv_heads).permute(1, 2, 0).reshape(lse.shape)
            o, lse = merge_attention_states(op, lsep, o, lse)
        out[rows] = o
    return out
