"""Grouped GEMM for mixtures of experts: rows sorted by group, each group times its own weight.

x [M, K] holds the rows of group 0, then group 1, ... (group e: rows offsets[e-1] to offsets[e], with
offsets [E] the cumulative ends, int32); w [E, N, K] stacks the groups' weights as nn.Linear stores
them. The result [M, N] is x[rows of e] @ w[e].T for every e, computed as one call:

- `grouped_gemm_torch`: torch's grouped matrix multiply (`torch._grouped_mm`, which on CPU runs each
  group's GEMM in C++ from one dispatch; on CUDA it is torch's grouped kernel where the GPU has one);
- `grouped_gemm_reference`: one F.linear per group, the readable definition the tests compare to, and
  the fallback where torch has no grouped mm;
- the Triton kernel (tessera/ops/triton/grouped_gemm.py) for the GPU backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[e])
        start = end
    return out


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if not _HAS_GROUPED_MM or x.shape[0] == 0:
        return grouped_gemm_reference(x, w, offsets)
    return torch._grouped_mm(x.contiguous(), w.transpose(1, 2), offs=offsets)
