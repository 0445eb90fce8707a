"""Paged decode attention (one query token per sequence), split along the context (flash-decoding).

Stage 1: one program per (sequence, KV head, split). It holds all QPK = Hq / Hkv query heads of the
KV group as the rows of one MMA tile (padded to >= 16 rows), so each K/V tile is loaded once per group,
walks the keys of its split BLOCK_N at a time through the block table with an online softmax, and
writes a partial output (normalised over its keys) and its log-sum-exp (natural log, -inf for an
empty split). Split boundaries are multiples of BLOCK_N, so only the last tile of the last split is
masked. With one split, stage 1 writes the final output directly.

Stage 2 (``reduce_decode_splits``): one program per (sequence, query head) merges the partials by
log-sum-exp, with exactly the math of ``tessera.ops.merge.merge_attention_states`` folded over the
splits (empty splits contribute nothing; all-empty gives 0 and -inf, never NaN).

The number of splits depends on shapes only (batch, heads, block-table width, SM count), never on
values in device memory, so the launch needs no device sync and is CUDA-graph friendly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tessera.ops.triton.prefill_attention import (
    FP32_DOT_PRECISION,
    LOG2E,
    _attn_key_tiles,
    _check_paged_inputs,
)

__all__ = ["paged_decode_attention", "reduce_decode_splits"]


@triton.jit
def _paged_decode_split_kernel(
    out,
    lse,
    q,
    k_cache,
    v_cache,
    seq_lens,
    block_tables,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_os,
    stride_oh,
    stride_osplit,
    stride_od,
    stride_ls,
    stride_lh,
    stride_lsplit,
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
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    full_end = tl.maximum(start, start + ((end - start) // BLOCK_N) * BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head = kv_head * QPK + offs_h
    h_valid = offs_h < QPK
    d_mask = offs_d < HEAD_DIM
    q_tile = tl.load(
        q + seq.to(tl.int64) * stride_qs + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=h_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + (seq_len - 1)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    k_base = k_cache + kv_head * stride_kh
    v_base = v_cache + kv_head * stride_vh
    bt_row = block_tables + seq.to(tl.int64) * stride_bt
    acc, l_i, m_i = _attn_key_tiles(
        acc, l_i, m_i, q_tile, k_base, v_base, bt_row, start, full_end, q_pos, seq_len, qk_scale, offs_d,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_key_tiles(
        acc, l_i, m_i, q_tile, k_base, v_base, bt_row, full_end, end, q_pos, seq_len, qk_scale, offs_d,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION,
    )  # fmt: skip

    # Empty split (start >= seq_len): l = 0, m = -inf -> out 0, lse -inf.
    nonempty = l_i > 0
    acc = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse_val = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, m_i)
    o_ptrs = out + seq.to(tl.int64) * stride_os + head[:, None] * stride_oh + split * stride_osplit
    tl.store(
        o_ptrs + offs_d[None, :] * stride_od, acc.to(out.dtype.element_ty), mask=h_valid[:, None] & d_mask[None, :]
    )
    l_ptrs = lse + seq.to(tl.int64) * stride_ls + head * stride_lh + split * stride_lsplit
    tl.store(l_ptrs, lse_val, mask=h_valid)


@triton.jit
def _reduce_splits_kernel(
    out,
    lse_out,
    part_out,
    part_lse,
    stride_ps,
    stride_ph,
    stride_psplit,
    stride_pd,
    stride_pls,
    stride_plh,
    stride_plsplit,
    stride_os,
    stride_oh,
    stride_od,
    stride_ls,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(
        part_lse + seq.to(tl.int64) * stride_pls + head * stride_plh + offs_s * stride_plsplit,
        mask=s_mask,
        other=float("-inf"),
    ).to(tl.float32)
    # Same math as merge_attention_states: shift by the max (0 if every split is empty), weights
    # exp(lse - max) (0 for empty splits), whose outputs are ignored via where().
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    denom = tl.sum(w, 0)
    inv = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
    coef = w * inv
    po = tl.load(
        part_out
        + seq.to(tl.int64) * stride_ps
        + head * stride_ph
        + offs_s[:, None] * stride_psplit
        + offs_d[None, :] * stride_pd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    merged = tl.sum(tl.where(coef[:, None] > 0, po * coef[:, None], 0.0), 0)
    tl.store(
        out + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d * stride_od,
        merged.to(out.dtype.element_ty),
        mask=d_mask,
    )
    merged_lse = tl.where(denom > 0, m + tl.log(tl.where(denom > 0, denom, 1.0)), float("-inf"))
    tl.store(lse_out + seq.to(tl.int64) * stride_ls + head * stride_lh, merged_lse)


def reduce_decode_splits(
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``[S, H, NS, D]`` partial outputs with their ``[S, H, NS]`` natural-log LSEs into
    ``([S, H, D] out, [S, H] float32 lse)``; the math of ``merge_attention_states`` folded over NS."""
    s, h, ns, d = partial_out.shape
    if partial_lse.shape != (s, h, ns):
        raise ValueError(f"partial_lse {tuple(partial_lse.shape)} does not match partial_out {(s, h, ns, d)}")
    if out is None:
        out = torch.empty((s, h, d), dtype=out_dtype or partial_out.dtype, device=partial_out.device)
    if lse is None:
        lse = torch.empty((s, h), dtype=torch.float32, device=partial_out.device)
    if s == 0 or h == 0:
        return out, lse
    _reduce_splits_kernel[(s, h)](
        out, lse, partial_out, partial_lse,
        *partial_out.stride(), *partial_lse.stride(), *out.stride(), *lse.stride(),
        NUM_SPLITS=ns, HEAD_DIM=d,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(ns)), BLOCK_D=triton.next_power_of_2(d),
        num_warps=1 if not partial_out.is_cuda else (2 if d <= 128 else 4),
    )  # fmt: skip
    return out, lse


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU about twice, with at least 256 keys per
    split and at most 64 splits. Depends on shapes only (no device sync)."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 8
    want = triton.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(want, triton.cdiv(max(1, max_context), 256), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    block_n: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new query token per sequence against its whole paged context.

    Args:
        q: ``[S, Hq, D]``, the query of each sequence (its K/V already written to the cache).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``.
        seq_lens: ``[S]`` int32 context lengths including the new token (0 is allowed: output 0).
        block_tables: ``[S, max_blocks]`` int32.
        scale: softmax scale.
        num_splits: splits of the context (None: ``default_num_splits``, from shapes only).
        out: optional ``[S, Hq, D]`` output buffer.
        return_lse: also return the ``[S, Hq]`` float32 natural-log LSE (for merging with other parts).
        block_n: keys per step override (power of two >= 16).
    """
    qpk, block_size = _check_paged_inputs(q, k_cache, v_cache)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((s, hq), dtype=torch.float32, device=q.device)
    if s == 0:
        return (out, lse) if return_lse else out
    fp32 = q.dtype == torch.float32
    block_n = block_n or (32 if fp32 else 64)
    if num_splits is None:
        num_splits = default_num_splits(s, hkv, block_tables.shape[1] * block_size, q.device)
    num_splits = max(1, int(num_splits))
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        part_out = torch.empty((s, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((s, hq, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    _paged_decode_split_kernel[(s, hkv, num_splits)](
        part_out, part_lse, q, k_cache, v_cache, seq_lens, block_tables, float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        *part_out.stride(), *part_lse.stride(),
        *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        QPK=qpk, HEAD_DIM=d, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(qpk)), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=FP32_DOT_PRECISION if fp32 else "tf32",
        num_warps=(8 if block_d > 128 else 4) if q.is_cuda else 1,
        num_stages=(3 if block_d <= 128 and not fp32 else 2) if q.is_cuda else 1,
    )  # fmt: skip
    if num_splits > 1:
        reduce_decode_splits(part_out, part_lse, out=out, lse=lse)
    return (out, lse) if return_lse else out
