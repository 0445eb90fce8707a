"""Grouped GEMM over rows sorted by expert (mixture-of-experts layers), the GPU backend's kernel.

x [M, K] holds expert 0's rows, then expert 1's, ... (offsets [E] int32: cumulative ends); w [E, N, K]
stacks the experts' weights as nn.Linear stores them; out [M, N] = x[rows of e] @ w[e].T.

One program computes a BLOCK_M x BLOCK_N tile of one expert's rows, so no tile mixes two experts (the
same scheme as vLLM's fused_moe, without its padded copy of the token ids). The tile schedule is built
on the device from the offsets with tensor ops, and the grid is the upper bound ceil(M / BLOCK_M) + E
tiles (programs past the last tile exit at once): no host sync, so a step can be captured in a CUDA
graph. fp32 accumulation; fp32 inputs multiply as three TF32 MMAs per product ("tf32x3", about fp32
accuracy, as prefill_attention.py); bf16 under the CPU interpreter is upcast first (its dot has no bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grouped_gemm_triton", "tile_schedule"]


@triton.jit
def _grouped_gemm_kernel(
    x, w, out, tile_expert, tile_row, ends,
    N, K,
    stride_xm, stride_we, stride_wn, stride_wk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    expert = tl.load(tile_expert + tile)
    if expert < 0:  # past the last tile of the upper-bound grid
        return
    row0 = tl.load(tile_row + tile)
    row_end = tl.load(ends + expert)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptr = x + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    b_ptr = w + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_wk
    o_ptr = out + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tile_schedule(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of the upper-bound grid (ceil(M / block_m) + E tiles): its expert (-1: no tile) and
    first row. Tiles of expert e cover its rows in steps of block_m."""
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    grid = -(-num_rows // block_m) + offsets.numel()
    t = torch.arange(grid, device=offsets.device)
    expert = torch.searchsorted(tile_end, t, right=True)
    valid = expert < offsets.numel()
    e = expert.clamp(max=offsets.numel() - 1)
    first_tile = tile_end[e] - tiles[e]
    row = ends[e] - counts[e] + (t - first_tile) * block_m
    return torch.where(valid, e, -1).to(torch.int32), row.to(torch.int32)


def grouped_gemm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, block_m: int = 16,
                        block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    m, k = x.shape
    e, n, k_w = w.shape
    if k_w != k or offsets.numel() != e:
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, {offsets.numel()} offsets")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    tile_expert, tile_row = tile_schedule(offsets, m, block_m)
    grid = (tile_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        x, w, out, tile_expert, tile_row, offsets.to(torch.int32),
        n, k, x.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
        UPCAST=not x.is_cuda and x.dtype == torch.bfloat16,
    )  # fmt: skip
    return out
