"""Paged prefill attention (varlen, causal, GQA) — FastAttention's tiling applied to a paged KV cache.

One program computes a tile of BLOCK_M query rows against the keys of one KV head, BLOCK_N keys at a
time, with an online softmax (fp32 ``m``, ``l``, ``acc``). The rows of a tile are BLOCK_Q query tokens
x the QPK = Hq / Hkv query heads of the KV group, so each K/V tile is loaded once for the whole group
(a decode token with GQA 8 still fills 8 rows of the MMA). Keys are read through the block table, one
physical block id per key, so BLOCK_N need not equal the cache block size.

Causal masking is bottom-right aligned: query i of a sequence sits at ``seq_len - q_len + i``. The key
loop is cut in two phases:

* key tiles entirely at or below the diagonal of the tile's *first* query: no mask at all;
* the tiles that cross the diagonal (up to the tile's *last* query position): the mask is computed on
  the fly from positions (and ``seq_len``) for that tile only.

Tiles entirely above the diagonal are never visited (the loop bound stops at the last query's
position). No N x N mask or score matrix exists anywhere: the largest temporary is BLOCK_M x BLOCK_N.

The flat grid has one program per (query tile, KV head); a program finds its sequence by binary search
over ``cu_seqlens_q`` (sequence ``s`` owns tiles ``[cu[s] // BLOCK_Q + s, cu[s+1] // BLOCK_Q + s + 1)``),
so the grid size ``T // BLOCK_Q + S`` is known on the host without a device sync (CUDA-graph friendly)
and mixed batches (decode rows with q_len = 1 next to long prefill chunks) waste few programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["paged_prefill_attention"]

LOG2E = 1.4426950408889634
# fp32 inputs: three TF32 MMAs per product (about fp32 accuracy, ~1e-6 relative) — "ieee" FMA dots spill
# registers heavily at these tile sizes. bf16/fp16 inputs ignore this (plain MMAs, fp32 accumulate).
FP32_DOT_PRECISION = "tf32x3"


@triton.jit
def _find_seq_idx(cu_seqlens_q, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with cu_seqlens_q[s] // BLOCK_Q + s <= tile_idx (binary search)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attn_key_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    bt_row,
    start_n,
    end_n,
    q_pos,
    seq_len,
    qk_scale,
    offs_d,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax over keys [start_n, end_n) (start_n a multiple of BLOCK_N), read through the
    block table row ``bt_row``. MASKED=False: every key is valid for every row (below the diagonal);
    MASKED=True: key j is kept for row r iff j <= q_pos[r] and j < seq_len. ``qk_scale`` includes log2(e).
    Shared with the decode kernel."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + offs_n0
        n_valid = offs_n < seq_len
        if MASKED:
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
        in_blk = offs_n % BLOCK_SIZE
        k_ptrs = k_base + blk[None, :] * stride_kb + in_blk[None, :] * stride_ks + offs_d[:, None] * stride_kd
        v_ptrs = v_base + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if MASKED:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs, mask=n_valid[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
            else:
                k = tl.load(k_ptrs, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)

        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASKED:
            keep = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        if MASKED:
            if BLOCK_D == HEAD_DIM:
                v = tl.load(v_ptrs, mask=n_valid[:, None], other=0.0)  # [BLOCK_N, BLOCK_D]
            else:
                v = tl.load(v_ptrs, mask=n_valid[:, None] & d_mask[None, :], other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    out,
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seq_lens,
    block_tables,
    qk_scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    QPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Reversed, so that the last (longest: they see the most keys) tiles of each sequence start first and
    # the cheap ones fill the tail of the launch.
    tile_idx = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_seq_idx(cu_seqlens_q, tile_idx, num_seqs, BLOCK_Q)
    q_begin = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    q_start = (tile_idx - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query token of this tile
    if q_start >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx_len = seq_len - q_len  # cached prefix before the new tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = q_start + offs_m // QPK
    head = kv_head * QPK + offs_m % QPK
    row_valid = (offs_m < BLOCK_Q * QPK) & (tok < q_len)
    d_mask = offs_d < HEAD_DIM
    q_pos = ctx_len + tok  # absolute position of each row's query

    q_row = (q_begin + tok).to(tl.int64) * stride_qt + head * stride_qh
    q_tile = tl.load(
        q + q_row[:, None] + offs_d[None, :] * stride_qd, mask=row_valid[:, None] & d_mask[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = k_cache + kv_head * stride_kh
    v_base = v_cache + kv_head * stride_vh
    bt_row = block_tables + seq.to(tl.int64) * stride_bt
    q_last = tl.minimum(q_start + BLOCK_Q, q_len) - 1
    # Keys [0, full_end) are <= the first query's position: no mask. Keys [full_end, last_pos] cross the
    # diagonal of this tile: masked. Keys past the last query's position are never visited.
    full_end = ((ctx_len + q_start + 1) // BLOCK_N) * BLOCK_N
    masked_end = ctx_len + q_last + 1
    acc, l_i, m_i = _attn_key_tiles(
        acc, l_i, m_i, q_tile, k_base, v_base, bt_row, 0, full_end, q_pos, seq_len, qk_scale, offs_d,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_key_tiles(
        acc, l_i, m_i, q_tile, k_base, v_base, bt_row, full_end, masked_end, q_pos, seq_len, qk_scale,
        offs_d, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION,
    )  # fmt: skip

    # Every valid row saw key 0, so l_i > 0 there; padding rows are never stored.
    acc = acc / l_i[:, None]
    o_row = (q_begin + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out + o_row[:, None] + offs_d[None, :] * stride_od,
        acc.to(out.dtype.element_ty),
        mask=row_valid[:, None] & d_mask[None, :],
    )


def _check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and k_cache == v_cache shape [num_blocks, block_size, Hkv, D]; got "
            f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    hq, d = q.shape[1], q.shape[2]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != d or hq % hkv != 0:
        raise ValueError(f"head_dim / head counts mismatch: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return hq // hkv, block_size


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention of a flat ragged batch against a paged KV cache (K/V of the new tokens must
    already be in the cache).

    Args:
        q: ``[T, Hq, D]`` queries of all sequences, concatenated.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``; ``Hq % Hkv == 0``.
        cu_seqlens_q: ``[S+1]`` int32 prefix sums of the per-sequence query lengths.
        seq_lens: ``[S]`` int32 total KV length per sequence (cached prefix + new tokens).
        block_tables: ``[S, max_blocks]`` int32 physical block ids (entries past seq_len never read).
        scale: softmax scale (usually ``D ** -0.5``).
        max_seqlen_q: largest per-sequence query length (host int; only picks the tile shape).
        out: optional ``[T, Hq, D]`` output buffer (e.g. a static CUDA-graph buffer).
        block_m, block_n: tile-size overrides (rows per program, keys per step), powers of two >= 16.

    Returns:
        ``[T, Hq, D]`` in q's dtype (fp32 accumulation).
    """
    qpk, block_size = _check_paged_inputs(q, k_cache, v_cache)
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if t == 0 or num_seqs == 0:
        return out

    fp32 = q.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    # H100 tiles (checked for register spills with ptxas, sm_90): bf16/fp16 128x64 up to D=128, 64x64
    # above; fp32 (3xTF32 MMAs, a test/reference path) 64x32.
    max_m = 64 if (fp32 or block_d > 128) else 128
    if block_m is None:
        block_m = min(max_m, max(16, triton.next_power_of_2(max(1, max_seqlen_q) * qpk)))
    block_m = max(block_m, triton.next_power_of_2(qpk))  # at least one token (all heads of a group)
    block_q = block_m // qpk
    if block_n is None:
        block_n = 32 if fp32 else 64
    if q.is_cuda:
        num_warps = 8 if (block_m >= 128 or block_d > 128) else 4
        num_stages = 3 if (block_d <= 128 and not fp32) else 2
    else:
        num_warps = num_stages = 1
    grid = (t // block_q + num_seqs, hkv)
    _paged_prefill_kernel[grid](
        out, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
        float(scale) * LOG2E, num_seqs,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_tables.stride(0),
        QPK=qpk, HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=FP32_DOT_PRECISION if fp32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
