"""Merging partial attention results by log-sum-exp.

Attention over a set of keys can be computed piecewise: if ``(out_a, lse_a)`` is softmax attention
over key set A and ``(out_b, lse_b)`` the same over a disjoint key set B, attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

This is the one function every place that merges partial attention uses: the split-K (flash-decoding)
reduction in its torch form, CPU backends that chunk the context, and later ring attention. The
Triton decode reduction (``tessera.ops.triton.decode_attention``) implements the same math and is
tested against this function.

An empty partial (no keys) has ``lse = -inf``; its ``out`` is ignored, whatever it holds (zeros,
garbage, NaN). Merging two empty partials gives ``out = 0`` and ``lse = -inf``, never NaN.
"""

from __future__ import annotations

import torch

__all__ = ["merge_attention_states"]


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    Args:
        out_a, out_b: ``[T, H, D]`` partial outputs (each normalised over its own keys).
        lse_a, lse_b: ``[T, H]`` natural-log sum of exp of the scaled scores of each part
            (``-inf`` for a part with no keys).

    Returns:
        ``(out, lse)``: ``out`` is ``[T, H, D]`` in ``out_a``'s dtype, ``lse`` is ``[T, H]`` float32.
        The arithmetic is done in float32 (float64 inputs stay float64).
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"shape mismatch: out_a {tuple(out_a.shape)}, lse_a {tuple(lse_a.shape)}, "
            f"out_b {tuple(out_b.shape)}, lse_b {tuple(lse_b.shape)}"
        )
    cdtype = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la = lse_a.to(cdtype)
    lb = lse_b.to(cdtype)
    m = torch.maximum(la, lb)
    # Both parts empty: m = -inf; shift by 0 instead so that exp(-inf - 0) = 0 rather than NaN.
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    denom = wa + wb
    lse = m + torch.log(denom)  # log(0) = -inf for two empty parts
    inv = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
    ca = (wa * inv).unsqueeze(-1)
    cb = (wb * inv).unsqueeze(-1)
    # where(), not multiplication, so that the (ignored) output of an empty part cannot inject NaN.
    part_a = torch.where(ca > 0, out_a.to(cdtype) * ca, 0.0)
    part_b = torch.where(cb > 0, out_b.to(cdtype) * cb, 0.0)
    out = (part_a + part_b).to(out_a.dtype)
    lse_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)
