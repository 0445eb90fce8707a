"""Bit-plane quantized linear layers on GPUs: out = x @ W^T (+ bias), W read as packed bit planes.

W is an N-bit bit-plane weight (tessera.quant.bitplanes, tessera.quant.quantize): weight (n, k) =
scale[n, g] * q[n, k] + offset[n, g] with g = k // group_size and q = sum_i 2^i b_i, one bit b_i per
plane. Neither kernel ever writes a dequantized copy of W: each program loads the plane words of its
tile, rebuilds the codes in registers and multiplies them, using the same identity as the CPU kernel

    out[m, n] = sum_g scale[n, g] * (sum_{k in g} x[m, k] q[n, k]) + offset[n, g] * (sum_{k in g} x[m, k]).

The codes are integers below 256, exact in fp32, bf16 and fp16, so the per-group products are products
of the true codes with x (fp32 accumulation); scale and offset are applied once per group in fp32.

GPU layout (`GpuBitPlanes`, made by `to_gpu_layout` from the canonical planes):
    words  int32 [bits, K_pad / 32, N]  bit j of words[i, w, n] = bit i of the code of weight (n, 32 w + j)
    scale  fp32  [groups, N]            offset likewise
K-major with the output rows contiguous, like GPTQ's and Marlin's packed int4: a step along K reads,
per plane, one contiguous run of 4 * BLOCK_N bytes (coalesced across the threads that own the rows),
and the group parameters of a tile are one contiguous run too. The words are the canonical uint8 planes
reinterpreted 4 bytes at a time (bit k % 8 of byte k // 8 is weight k, little-endian, on CPUs and GPUs
alike), transposed; nothing is requantized.

Two kernels:
- GEMV (decode, M <= GEMV_MAX_M rows): a program owns BLOCK_N output rows (one per thread) and a
  range of K tiles (split-K when there are too few row blocks to fill the device; the splits' fp32
  partial sums are added afterwards, in a fixed order, so results do not depend on scheduling). Per K
  tile it loads `bits` words per row and sub-block (16 or 32 weights of one group), rebuilds the codes
  four to an int32 (byte lanes: one shift and one mask per plane for four weights), and for each x row
  does the group sums with fp32 FMAs inside the thread. Compiled for sm_90 (no GPU here, see the
  tests), an M = 1 tile is about 8 instructions per weight at 4 bits, ~120 registers, no spills.
- GEMM (M > GEMV_MAX_M): a [BLOCK_M, BLOCK_N] output tile; K advances at most 64 weights at a time,
  never past a group's end: the codes tile [KS, BLOCK_N] is built in registers in x's dtype and
  multiplied with tl.dot (wgmma on sm_90 for bf16/fp16; three TF32 MMAs, about fp32, for fp32), then
  scaled per group. Each row block rebuilds the codes again, so prefill-sized M pays that once per 64
  rows; nothing here is tuned (no GPU was lent when it was written).
Accumulation is fp32; the output has x's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["GEMV_MAX_M", "GpuBitPlanes", "bitplane_linear", "from_gpu_layout", "gemm_config", "gemv_config",
           "to_gpu_layout"]

# fp32 activations: three TF32 MMAs per product (about fp32 accuracy; the codes are exact in TF32, x is
# split in two), as in prefill_attention.py. bf16/fp16 ignore it (plain MMAs, fp32 accumulation).
FP32_DOT_PRECISION = "tf32x3"
GEMV_MAX_M = 4  # from here on the FMAs per weight outweigh rebuilding the codes: tl.dot takes over


@dataclass
class GpuBitPlanes:
    words: torch.Tensor   # int32 [bits, K_pad / 32, N]
    scale: torch.Tensor   # float32 [groups, N]
    offset: torch.Tensor  # float32 [groups, N]
    bits: int
    group_size: int
    k: int

    @property
    def n(self) -> int:
        return self.words.shape[2]

    @property
    def k_pad(self) -> int:
        return self.words.shape[1] * 32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.offset))


def to_gpu_layout(qw, device: torch.device | str | None = None) -> GpuBitPlanes:
    """A tessera.quant.quantize.QuantizedWeight (canonical planes) -> GpuBitPlanes on `device`."""
    planes = qw.planes.contiguous()
    bits, n, kb = planes.shape
    if kb % 4:
        raise ValueError(f"canonical planes must hold a multiple of 32 weights per row, got {kb * 8}")
    words = planes.view(torch.int32).transpose(1, 2).contiguous()
    g = GpuBitPlanes(words, qw.scale.t().contiguous().float(), qw.offset.t().contiguous().float(),
                     qw.bits, qw.group_size, qw.k)
    if device is not None:
        g = GpuBitPlanes(g.words.to(device), g.scale.to(device), g.offset.to(device), g.bits, g.group_size, g.k)
    return g


def from_gpu_layout(g: GpuBitPlanes):
    """The inverse of to_gpu_layout: a QuantizedWeight with canonical planes, on the CPU."""
    from tessera.quant.quantize import QuantizedWeight

    planes = g.words.cpu().transpose(1, 2).contiguous().view(torch.uint8)
    return QuantizedWeight(planes, g.scale.cpu().t().contiguous(), g.offset.cpu().t().contiguous(),
                           g.bits, g.group_size, g.k)


@triton.jit
def _gemv_kernel(out, part, x, words, scale, offset, bias, M, N, K, K_PAD, stride_xm, stride_om, tiles_per_split,
                 BITS: tl.constexpr, G: tl.constexpr, SUBW: tl.constexpr, NSUB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    # Output rows are the last (fastest) dimension of every tile, so each thread owns whole rows: the
    # plane words load coalesced across threads and every sum over K stays inside a thread (no shuffles).
    # A K tile is NSUB sub-blocks of SUBW weights (one group, one word or half of one). The codes are
    # rebuilt four at a time in the byte lanes of an int32: bit j of byte b of a word is weight 8 b + j,
    # so (word >> j) & 0x01010101 holds bit i of weights j, 8 + j, 16 + j, 24 + j, and OR-ing the planes
    # in at bit i makes four 8-bit codes with one shift and one mask per plane.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    sub = tl.arange(0, NSUB)
    j = tl.arange(0, 8)
    BPS: tl.constexpr = SUBW // 8  # bytes per sub-block
    # byte of its word that byte b of sub-block s is: two sub-blocks share a word when SUBW is 16
    byte = (sub % (32 // SUBW))[None, :] * BPS + tl.arange(0, BPS)[:, None]  # [BPS, NSUB]
    plane_stride = (K_PAD // 32) * N
    BLOCK_K: tl.constexpr = NSUB * SUBW
    n_tiles = tl.cdiv(K_PAD, BLOCK_K)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    acc = tl.zeros([BLOCK_M, NSUB, BLOCK_N], dtype=tl.float32)  # per sub-block; summed after the loop
    for t in range(t0, t1):
        ksub = t * BLOCK_K + sub * SUBW  # first weight of each sub-block
        wmask = (ksub < K_PAD)[:, None] & n_ok[None, :]
        wptr = words + (ksub // 32)[:, None] * N + offs_n[None, :]  # [NSUB, BLOCK_N]
        lanes = tl.zeros([8, NSUB, BLOCK_N], dtype=tl.uint32)  # [j, s, n]: four codes per word
        for i in tl.static_range(BITS):
            # unsigned: logical shifts, no sign extension to undo
            wd = tl.load(wptr + i * plane_stride, mask=wmask, other=0).to(tl.uint32, bitcast=True)
            lanes |= ((wd[None, :, :] >> j[:, None, None].to(tl.uint32)) & 0x01010101) << i
        q = (lanes[:, None, :, :] >> (8 * byte).to(tl.uint32)[None, :, :, None]) & 0xFF  # [j, b, s, n]
        qf = q.to(tl.float32)
        gptr = (ksub // G)[:, None] * N + offs_n[None, :]
        s = tl.load(scale + gptr, mask=wmask, other=0.0)
        o = tl.load(offset + gptr, mask=wmask, other=0.0)
        kx = (ksub[None, :] - (sub % (32 // SUBW))[None, :] * SUBW + 8 * byte)[None, :, :] + j[:, None, None]
        for mi in tl.static_range(BLOCK_M):
            xv = tl.load(x + mi * stride_xm + kx, mask=(kx < K) & (kx * 0 + mi < M), other=0.0).to(tl.float32)
            dots = tl.sum(tl.sum(qf * xv[:, :, :, None], axis=0), axis=0)  # [NSUB, BLOCK_N]: sum of x * q
            xs = tl.sum(tl.sum(xv, axis=0), axis=0)  # [NSUB]: sum of x (meets the offset)
            c = dots * s + xs[:, None] * o
            acc += tl.where(offs_m[:, None, None] == mi, c[None, :, :], 0.0)
    res = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], res, mask=mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :], res.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(out, x, words, scale, offset, bias, M, N, K, K_PAD, stride_xm, stride_om,
                 BITS: tl.constexpr, G: tl.constexpr, SUBW: tl.constexpr, NSUB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    sub = tl.arange(0, NSUB)
    j = tl.arange(0, SUBW)
    KS: tl.constexpr = NSUB * SUBW  # weights per step: within one group
    kk = tl.arange(0, KS)
    plane_stride = (K_PAD // 32) * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_PAD, KS):
        ksub = k0 + sub * SUBW  # first weight of each sub-block (a step of 16 may start mid-word)
        shift = (ksub % 32)[:, None] + j[None, :]  # [NSUB, SUBW]
        wptr = words + (ksub // 32)[:, None] * N + offs_n[None, :]  # [NSUB, BLOCK_N]
        q = tl.zeros([NSUB, SUBW, BLOCK_N], dtype=tl.int32)
        for i in tl.static_range(BITS):
            wd = tl.load(wptr + i * plane_stride, mask=n_ok[None, :], other=0)
            q += ((wd[:, None, :] >> shift[:, :, None]) & 1) << i
        # Codes < 256 are exact in x's dtype (bf16 and fp16 too): the dot is of the true codes. Through
        # fp32 because Triton's interpreter casts int32 to bf16 as if to uint16.
        qt = tl.reshape(q, [KS, BLOCK_N]).to(tl.float32).to(x.dtype.element_ty)
        xt = tl.load(x + offs_m[:, None] * stride_xm + (k0 + kk)[None, :],
                     mask=m_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot reads bf16 as raw uint16; bf16 x bf16 products are exact in fp32
            d = tl.dot(xt.to(tl.float32), qt.to(tl.float32), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        else:
            d = tl.dot(xt, qt, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        g = k0 // G
        s = tl.load(scale + g * N + offs_n, mask=n_ok, other=0.0)
        o = tl.load(offset + g * N + offs_n, mask=n_ok, other=0.0)
        xs = tl.sum(xt.to(tl.float32), axis=1)
        acc += d * s[None, :] + xs[:, None] * o[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out.dtype.element_ty), mask=mask)


def _split_k(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Enough programs for about two per SM (decode layers often have few row blocks); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return max(1, min(n_tiles, (2 * _sm_count(device.index)) // max(1, n_blocks)))


@functools.cache
def _sm_count(index: int | None) -> int:
    index = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_config(m: int, bits: int, group: int, cuda: bool) -> dict:
    """The GEMV's compile-time parameters for m rows (also what tests compile for sm_90)."""
    subw = 16 if group == 16 else 32  # valid group sizes are 16, 32 or multiples of 64
    block_m = triton.next_power_of_2(m)
    # Weights per K tile: each thread holds a tile's codes as fp32 for every row of x; fewer with more
    # rows so that they stay in registers (128 weights x 4 rows spills on sm_90).
    block_k = max(subw, 128 // block_m)
    return dict(BITS=bits, G=group, SUBW=subw, NSUB=block_k // subw, BLOCK_M=block_m,
                BLOCK_N=128 if cuda else 32, num_warps=4 if cuda else 1)  # one row per thread on GPUs


def gemm_config(m: int, bits: int, group: int, dtype: torch.dtype, cuda: bool) -> dict:
    """The GEMM's compile-time parameters for m rows of `dtype`."""
    subw = 16 if group == 16 else 32
    ks = min(group, 64)  # a step never leaves its group (groups above 64 are multiples of 64); 128 spills
    fp32 = dtype == torch.float32
    block_m = 16 if m <= 16 else 32 if m <= 32 or fp32 else 64  # fp32's three-pass dots spill at 64 rows
    return dict(BITS=bits, G=group, SUBW=subw, NSUB=ks // subw, BLOCK_M=block_m, BLOCK_N=64,
                DOT_PRECISION=FP32_DOT_PRECISION if fp32 else "tf32", UPCAST=not cuda and dtype == torch.bfloat16,
                # on sm_90, 4 warps spill at 64 x 64 tiles, and with fp32's three-pass dots from 32 rows
                num_warps=(8 if block_m == 64 or (fp32 and block_m > 16) else 4) if cuda else 1)


def bitplane_linear(x: torch.Tensor, w: GpuBitPlanes, bias: torch.Tensor | None = None, *,
                    split_k: int | None = None, gemv_max_m: int = GEMV_MAX_M) -> torch.Tensor:
    """x [..., k] (fp32, bf16 or fp16) @ W^T (+ bias) -> [..., n] in x's dtype. `split_k` forces the
    GEMV's number of K splits (tests); `gemv_max_m` the largest row count that takes the GEMV."""
    k, n = w.k, w.n
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {k}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    has_bias = bias is not None
    b = bias if has_bias else out  # a placeholder pointer when there is no bias
    if m <= gemv_max_m:
        cfg = gemv_config(m, w.bits, w.group_size, x.is_cuda)
        block_k = cfg["NSUB"] * cfg["SUBW"]
        n_blocks, n_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(w.k_pad, block_k)
        split = split_k or _split_k(n_blocks, n_tiles, x.device)
        per = triton.cdiv(n_tiles, max(1, min(split, n_tiles)))
        split = triton.cdiv(n_tiles, per)
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
        _gemv_kernel[(n_blocks, split)](
            out, part, x2, w.words, w.scale, w.offset, b, m, n, k, w.k_pad, x2.stride(0), out.stride(0), per,
            HAS_BIAS=has_bias, SPLIT=split > 1, **cfg,
        )  # fmt: skip
        if split > 1:  # the splits in a fixed order: deterministic
            acc = part.sum(0)
            if has_bias:
                acc += bias.float()
            out.copy_(acc)
    else:
        cfg = gemm_config(m, w.bits, w.group_size, x.dtype, x.is_cuda)
        _gemm_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))](
            out, x2, w.words, w.scale, w.offset, b, m, n, k, w.k_pad, x2.stride(0), out.stride(0),
            HAS_BIAS=has_bias, **cfg,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
