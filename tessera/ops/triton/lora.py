"""Multi-LoRA on the GPU: one fused shrink + expand kernel per output slice for a whole mixed batch.

Each program takes one row and a block of its output slice's columns: it reads the row's adapter slot
(-1: the base model, whose row is left untouched), computes h = x[t] @ A_slot[:, slice's rank columns]
in fp32, and adds h @ B_slot[:, block] to y in place (BGMV, Punica's decode shape; rows of one adapter
share the slot's weights through the cache). The shrink is recomputed per column block: it is rank-
sized (r <= 64) against the layer's in_features, small next to what the base GEMM already did.

Layouts (tessera.lora.manager): x [T, in]; a [S, in, n_slices * rank]; b[j] [S, rank, slice_out];
token_slots [T] int32; y [T, out] (the base output, updated in place).
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


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: list[torch.Tensor],
                       slices: list[tuple[int, int]], token_slots: torch.Tensor, rank: int) -> None:
    """y[t, slice j] += (x[t] @ a[s][:, j*rank:(j+1)*rank]) @ b[j][s] for every row t with slot s >= 0."""
    t, k = x.shape
    if t == 0:
        return
    assert y.stride(-1) == 1 and a.stride(-1) == 1, "y and a must be contiguous in their last dimension"
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_r = triton.next_power_of_2(rank)
    for j, (o0, o1) in enumerate(slices):
        bj = b[j]
        n = o1 - o0
        block_n = min(128, triton.next_power_of_2(n))
        grid = (t, triton.cdiv(n, block_n))
        _lora_kernel[grid](y, x, a, bj, token_slots, y.stride(0), x.stride(0), a.stride(0), a.stride(1),
                           bj.stride(0), bj.stride(1), k, n, o0, j * rank,
                           R=rank, BLOCK_K=min(64, triton.next_power_of_2(k)), BLOCK_N=block_n, BLOCK_R=block_r,
                           num_warps=4 if x.is_cuda else 1)
