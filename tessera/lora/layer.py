"""LoRALinearMethod: the Linear seam (tessera/ops/linear.py) with LoRA added to a base method.

y = base(x) + for each segment of rows sharing an adapter slot s: (x A_s^T) (s B_s^T), written into
y's rows in place. Rows of the base model are in no segment: nothing is added to them, so their
output is exactly the base method's.

Why segments (SGMV) on the CPU: the runner orders each step's rows so that an adapter's rows are
contiguous, so a segment is a plain row range, and its LoRA is two dense GEMMs on views, with no
gather of the rows and no per-row weights (BGMV's [rows, r, in] gather, which vLLM's torch path does,
reads each adapter's A once per row: 64 decode rows of one adapter read A 64 times). The number of
segments is at most 2 x the distinct adapters in the step (decodes, then prefill chunks), so the
cost is a few small GEMMs per layer however many requests share an adapter; prefill segments are long
GEMMs at full efficiency. The shrink of a fused layer (q/k/v, gate/up) is one GEMM against its slices'
A side by side; the expand is one addmm per output slice, so no zero blocks are multiplied.

On CUDA the step's per-row slot index drives one Triton kernel per output slice
(tessera.ops.triton.lora), the BGMV shape that suits a GPU.
"""

from __future__ import annotations

import torch

from tessera.ops.linear import Linear, LinearMethod


class LoRALinearMethod(LinearMethod):
    def __init__(self, base: LinearMethod, manager):
        self.base = base
        self.manager = manager
        self.name = f"{base.name} + LoRA"

    def process_weights(self, layer: Linear) -> None:
        self.base.process_weights(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = self.base.apply(layer, x)
        step = self.manager.step
        if step is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if step.token_slots is not None:
            from tessera.ops.triton.lora import lora_shrink_expand

            lora_shrink_expand(y2, x2, layer.lora_a, layer.lora_b, layer.lora_slices, step.token_slots,
                               self.manager.max_rank)
            return y
        add_lora_segments(y2, x2, layer.lora_a, layer.lora_b, layer.lora_slices, step.segments,
                          self.manager.max_rank)
        return y


def add_lora_segments(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: list[torch.Tensor],
                      slices: list[tuple[int, int]], segments: list[tuple[int, int, int]], rank: int) -> None:
    """y[a:b] += (x[a:b] @ lora_a[s]) split by slice @ lora_b[j][s], for each (a, b, s) in segments.
    y: [T, out]; x: [T, in]; lora_a: [S, in, n_slices * rank]; lora_b[j]: [S, rank, slice_out]."""
    single = len(slices) == 1
    for a, b, s in segments:
        h = torch.mm(x[a:b], lora_a[s])
        if single:
            y[a:b].addmm_(h, lora_b[0][s])
            continue
        for j, (o0, o1) in enumerate(slices):
            y[a:b, o0:o1].addmm_(h[:, j * rank:(j + 1) * rank], lora_b[j][s])


def lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: list[torch.Tensor],
                   slices: list[tuple[int, int]], token_slots: torch.Tensor, rank: int,
                   out_features: int) -> torch.Tensor:
    """The LoRA delta [T, out] row by row in fp32 (tests' reference for both paths)."""
    out = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        h = x[t].float() @ lora_a[s].float()
        for j, (o0, o1) in enumerate(slices):
            out[t, o0:o1] = h[j * rank:(j + 1) * rank] @ lora_b[j][s].float()
    return out
