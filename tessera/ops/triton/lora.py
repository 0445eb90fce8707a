"""Multi-LoRA on the GPU: one fused shrink + expand kernel per layer for a whole mixed batch.

Each program takes one row and a block of output columns: it reads the row's adapter slot (-1: the
base model, whose row is left untouched), computes h = x[t] @ A_slot in fp32, and adds h @ B_slot[:,
block] to y in place (BGMV, Punica's decode shape; rows of one adapter share the slot's weights through
the cache). The shrink is recomputed per column block: it is rank-sized (R = slices x rank, <= 192)
against the layer's in_features, small next to what the base GEMM already did.

Layouts (tessera.lora.manager): x [T, in]; a [S, in, R]; b [S, R, out] (block-diagonal for a fused
layer's slices); token_slots [T] int32; y [T, out] (the base output, updated in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lora_shrink_expand"]


@triton.jit
def _lora_kernel(y, x, a, b, slots, stride_y, stride_x, stride_as, stride_ak, stride_bs, stride_br,
                 K, N, col0, rank_off,
                 R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    s = tl.load(slots + t)
    if s >= 0:  # a base-model row: nothing to add
        s64 = s.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        h = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = offs_k < K
            xv = tl.load(x + t * stride_x + offs_k, mask=km, other=0.0).to(tl.float32)
            av = tl.load(a + s64 * stride_as + offs_k[:, None] * stride_ak + rank_off + offs_r[None, :],
                         mask=km[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            h += tl.sum(xv[:, None] * av, 0)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = offs_n < N
        bv = tl.load(b + s64 * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :],
                     mask=rmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
        d = tl.sum(h[:, None] * bv, 0)
        yp = y + t * stride_y + col0 + offs_n
        yv = tl.load(yp, mask=nm, other=0.0)
        tl.store(yp, (yv.to(tl.float32) + d).to(yv.dtype), mask=nm)


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor) -> None:
    """y[t] += (x[t] @ a[s]) @ b[s] for every row t whose slot s = token_slots[t] is >= 0."""
    t, k = x.shape
    if t == 0:
        return
    assert y.stride(-1) == 1 and a.stride(-1) == 1 and b.stride(-1) == 1, "y, a and b must be row-major"
    if x.stride(-1) != 1:
        x = x.contiguous()
    r, n = a.shape[-1], b.shape[-1]
    block_n = min(128, triton.next_power_of_2(n))
    grid = (t, triton.cdiv(n, block_n))
    _lora_kernel[grid](y, x, a, b, token_slots, y.stride(0), x.stride(0), a.stride(0), a.stride(1),
                       b.stride(0), b.stride(1), k, n, 0, 0,
                       R=r, BLOCK_K=min(64, triton.next_power_of_2(k)), BLOCK_N=block_n,
                       BLOCK_R=triton.next_power_of_2(r), num_warps=4 if x.is_cuda else 1)
