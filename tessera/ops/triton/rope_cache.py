"""Fused rotary embedding (in place on q and k) + paged KV-cache write of the rotated k and of v.

RoPE convention: HF Llama "rotate_half" (also Mistral, Qwen2/3): the head dimension is split into a
first half x1 = x[:D/2] and a second half x2 = x[D/2:], and

    out[:D/2] = x1 * cos - x2 * sin
    out[D/2:] = x2 * cos + x1 * sin

``cos_sin_cache: [max_position, D]`` holds, for each position p, ``cos(p * inv_freq)`` in its first
D/2 columns and ``sin(p * inv_freq)`` in its last D/2 columns (``inv_freq[i] = base ** (-2i / D)``,
with any rope scaling already applied), i.e. ``torch.cat([freqs.cos(), freqs.sin()], -1)``. The
rotation covers the whole head dimension (partial rotary is not supported). Arithmetic is fp32,
rounded once to q/k's dtype (HF rounds cos/sin to the model dtype first; the difference is one
rounding).

One program per token handles all its heads: it reads cos/sin once, rotates every q head and k head
in place, and, when ``slot_mapping[t] >= 0``, stores rotated k and v into the caches at
``slot = block * block_size + offset``. A slot of -1 skips the cache write (padding tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_rope_and_cache_write"]


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, stride_d, t, cos, sin, offs_h, offs_half,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    """Rotate the [NUM_HEADS, D] row of token t in place; return the rotated halves (fp32)."""
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_half[None, :] < HALF)
    p1 = x_ptr + t.to(tl.int64) * stride_t + offs_h[:, None] * stride_h + offs_half[None, :] * stride_d
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, o2.to(x_ptr.dtype.element_ty), mask=mask)
    return o1.to(x_ptr.dtype.element_ty), o2.to(x_ptr.dtype.element_ty), mask


@triton.jit
def _rope_cache_kernel(
    q,
    k,
    v,
    positions,
    cos_sin,
    k_cache,
    v_cache,
    slot_mapping,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cs,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(positions + t).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    half_mask = offs_half < HALF
    cos = tl.load(cos_sin + pos * stride_cs + offs_half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin + pos * stride_cs + HALF + offs_half, mask=half_mask, other=0.0).to(tl.float32)

    offs_hq = tl.arange(0, BLOCK_HQ)
    _rotate_heads(q, stride_qt, stride_qh, stride_qd, t, cos, sin, offs_hq, offs_half, NUM_Q_HEADS, HALF)
    offs_hkv = tl.arange(0, BLOCK_HKV)
    k1, k2, kmask = _rotate_heads(
        k, stride_kt, stride_kh, stride_kd, t, cos, sin, offs_hkv, offs_half, NUM_KV_HEADS, HALF
    )

    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        kc = k_cache + blk * stride_kcb + off * stride_kcs + offs_hkv[:, None] * stride_kch
        kc1 = kc + offs_half[None, :] * stride_kcd
        tl.store(kc1, k1.to(k_cache.dtype.element_ty), mask=kmask)
        tl.store(kc1 + HALF * stride_kcd, k2.to(k_cache.dtype.element_ty), mask=kmask)
        offs_d = tl.arange(0, BLOCK_D)
        vmask = (offs_hkv[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
        vals = tl.load(
            v + t.to(tl.int64) * stride_vt + offs_hkv[:, None] * stride_vh + offs_d[None, :] * stride_vd,
            mask=vmask,
            other=0.0,
        )
        vc = v_cache + blk * stride_vcb + off * stride_vcs + offs_hkv[:, None] * stride_vch
        tl.store(vc + offs_d[None, :] * stride_vcd, vals.to(v_cache.dtype.element_ty), mask=vmask)


def fused_rope_and_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` in place at ``positions [T]`` and write k, v into
    ``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` at ``slot_mapping [T]`` (int64, -1 = skip).

    q, k, v may be strided views (e.g. slices of a fused QKV projection); ``cos_sin_cache`` is
    ``[max_position, D]`` with cos in the first D/2 columns and sin in the last D/2 (contiguous rows).
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape != (t, hkv, d) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_position, {d}] with contiguous rows")
    if d % 2:
        raise ValueError(f"head_dim must be even for rotary embedding, got {d}")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match k {tuple(k.shape)}")
    if t == 0:
        return
    _rope_cache_kernel[(t,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        *q.stride(), *k.stride(), *v.stride(), cos_sin_cache.stride(0),
        *k_cache.stride(), *v_cache.stride(),
        NUM_Q_HEADS=hq, NUM_KV_HEADS=hkv, HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
        BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_D=triton.next_power_of_2(d),
        num_warps=4 if q.is_cuda else 1,
    )  # fmt: skip
