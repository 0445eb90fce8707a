"""RMSNorm with HF semantics (normalise in fp32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    # True for a subclass whose weight depends on the row (tessera.blockllm's per-variant norms): the
    # backends' kernels, which take one weight, leave it to its forward.
    per_row = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        h, residual = self.normalize(x, residual)
        out = self.weight * h
        return out if residual is None else (out, residual)

    def normalize(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(x [+ residual]) / rms in fp32, back in x's dtype, and the new residual (None without one)."""
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype), residual
