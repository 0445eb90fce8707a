"""RMSNorm and fused residual-add + RMSNorm, with HF Llama semantics.

HF computes ``h = x + residual`` in the model dtype, then
``weight * (h.float() * rsqrt(mean(h.float() ** 2) + eps)).to(dtype)``. These kernels do the same
roundings (the sum is rounded to the dtype and that rounded value is normalised; the normalised value
is rounded to the dtype before the multiplication by the weight, which is done in fp32 and rounded
once), so that for fp32 they agree with HF to fp32 rounding and for bf16 match it bit for bit in
most elements. One program per row; the whole hidden dimension is one block (hidden <= 65536).
The outputs have x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_add_rmsnorm", "rmsnorm"]


@triton.jit
def _rmsnorm_kernel(
    out,
    new_res,
    x,
    res,
    weight,
    stride_o,
    stride_nr,
    stride_x,
    stride_r,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res + row * stride_r + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x.dtype.element_ty)
        tl.store(new_res + row * stride_nr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, 0) / N
    normed = (hf * (1.0 / tl.sqrt(var + eps))).to(x.dtype.element_ty)
    w = tl.load(weight + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out + row * stride_o + offs, y.to(out.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    weight = weight.contiguous()
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        nr2 = new_res.view(-1, n)
    else:
        r2, new_res, nr2 = x2, None, out2
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows,)](
            out2, nr2, x2, r2, weight,
            out2.stride(0), nr2.stride(0), x2.stride(0), r2.stride(0), float(eps),
            N=n, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=(4 if block <= 2048 else 8 if block <= 8192 else 16) if x.is_cuda else 1,
        )  # fmt: skip
    return out, new_res


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` over the last dimension of ``x [..., N]``."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual``; ``normed = rmsnorm(new_residual) * weight``.

    Returns ``(normed, new_residual)`` as new tensors (inputs are not modified).
    """
    out, new_res = _launch(x, residual, weight, eps)
    return out, new_res
