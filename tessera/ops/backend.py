"""Which kernels run: "torch" (CPU paths, incl. the C++ decode kernel) or "triton" (GPU kernels).

Triton is used on CUDA devices. TESSERA_ATTENTION_BACKEND=triton forces it on CPU tensors too, where
the kernels run in Triton's interpreter (TRITON_INTERPRET=1): slow, but it exercises the exact GPU code
path end to end on a machine without a GPU (the tests do this at small sizes)."""

from __future__ import annotations

import os

import torch


def choose_backend(device: torch.device) -> str:
    forced = os.environ.get("TESSERA_ATTENTION_BACKEND")
    if forced:
        if forced not in ("torch", "triton"):
            raise ValueError(f"TESSERA_ATTENTION_BACKEND must be 'torch' or 'triton', got {forced!r}")
        return forced
    if device.type == "cuda":
        from tessera.ops.triton import HAS_TRITON

        return "triton" if HAS_TRITON else "torch"
    return "torch"
