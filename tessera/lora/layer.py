"""LoRALinearMethod: the Linear seam (tessera/ops/linear.py) with LoRA added to a base method.

y = base(x) + for every row with an adapter in slot s: (x A_s^T)(s B_s^T). Rows of the base model are
in no segment and no group: nothing is added to them, so their output is exactly the base method's.

How the products are grouped on a CPU (tessera.lora.manager plans each step; the runner orders the
rows so that an adapter's rows are contiguous, base rows first):

- With tessera's C++ kernels (tessera.ops.cpu_kernels, the usual case): every adapter's rows are one
  *segment* and all of a step's segments go to one call per linear, `lora_sgmv`
  (tessera/ops/csrc/lora_sgmv.cpp): no gathers, no padding, fp32 products, parallel over blocks of rows,
  the expands of fused layers reading only their diagonal blocks; long segments (prefill chunks) as
  ATen GEMMs. The C++ decode stack calls the same function, so both paths give the same bits.

Without them (TESSERA_CPU_KERNELS=0, or a machine without a compiler), ATen ops:

- Prefill chunks, and decodes when at most two adapters have any: *segments*. A segment is a row
  range of one adapter; its LoRA is a shrink and an expand GEMM on views of x and y, exact in work.
  Prefill segments are long, so these GEMMs run at full efficiency.
- The decode rows of three or more adapters: one *padded group* (but for a run much longer than the
  others, which goes alone as a segment rather than set the padded length) (SGMV as a batched GEMM). Their rows
  are gathered into [adapters, L, in] (L = the most rows any adapter has), then one bmm against the
  slot-stacked A [adapters, in, R] and one against B [adapters, R, out] (one per output slice of a
  fused layer, reading only B's diagonal blocks: at decode sizes the product is bound by reading
  the adapters' weights), and the result is gathered back and added to y. The work is adapters x L
  rows instead of the rows themselves (uniform spreads pad little; a skewed one up to a few x), but
  it is a handful of tensor ops for any number of adapters, where segments take three per adapter:
  on CPUs a small GEMM costs ~10-30 us in fixed overhead whatever its size, which at decode sizes
  (rank 16 against hidden 576) is far more than its arithmetic. BGMV (vLLM's torch path: gather each
  row's A and B, [rows, in, R]) copies each adapter's weights once per row; here they are read once
  per step.

On CUDA the step's per-row slot index drives one Triton kernel per layer (tessera.ops.triton.lora),
BGMV, the shape that suits a GPU.
"""

from __future__ import annotations

import torch

from tessera.ops.linear import Linear, LinearMethod

# Segments this long or longer (prefill chunks) go to two ATen GEMMs in lora_sgmv: their fixed cost is
# small against the work, and the BLAS (oneDNN's AMX/bf16 kernels here) outruns the kernel's fp32 FMAs.
GEMM_FROM_ROWS = 64


class LoRALinearMethod(LinearMethod):
    def __init__(self, base: LinearMethod, manager):
        self.base = base
        self.manager = manager
        self.name = f"{base.name} + LoRA"

    def process_weights(self, layer: Linear) -> None:
        self.base.process_weights(layer)

    def decode_op(self, layer: Linear, stack_cls):
        # The base method's product with the slots attached: the C++ stack adds the step's adapters
        # with the same ops as apply() below (prepare_fused_step hands it the step's plan), so decode
        # steps of any mix of adapters skip the Python layers as base-only steps do.
        op = self.base.decode_op(layer, stack_cls) if hasattr(self.base, "decode_op") else None
        if op is None or not hasattr(stack_cls, "with_lora"):
            return None
        return stack_cls.with_lora(op, layer.lora_a, layer.lora_b, layer.lora_slices)

    def fused_step_ok(self) -> bool:
        step = self.manager.step
        return step is None or step.token_slots is None  # the Triton kernel's steps are CUDA's

    def prepare_fused_step(self, stack) -> None:
        step = self.manager.step
        if step is None:
            stack.clear_lora_step()
            return
        # The stack exists only where the C++ kernels do, and then the plan is segments only.
        assert step.group is None, "a padded group in a step of the C++ kernels"
        stack.set_lora_step(step.segments, GEMM_FROM_ROWS)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = self.base.apply(layer, x)
        step = self.manager.step
        if step is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if step.token_slots is not None:
            from tessera.ops.triton.lora import lora_shrink_expand

            lora_shrink_expand(y2, x2, layer.lora_a, layer.lora_b, step.token_slots)
            return y
        kernels = self.manager.kernels
        if kernels is not None:
            kernels.lora_sgmv(y2, x2, layer.lora_a, layer.lora_b, step.segments, layer.lora_slices, GEMM_FROM_ROWS)
            return y
        if step.group is not None:
            add_lora_group(y2, x2, layer.lora_a, layer.lora_b, step.group, layer.lora_slices)
        add_lora_segments(y2, x2, layer.lora_a, layer.lora_b, step.segments)
        return y


def add_lora_segments(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      segments: list[tuple[int, int, int]]) -> None:
    """y[a:b] += (x[a:b] @ lora_a[s]) @ lora_b[s] for each (a, b, s) in segments.
    y: [T, out]; x: [T, in]; lora_a: [S, in, R]; lora_b: [S, R, out]."""
    dt = lora_a.dtype
    for a, b, s in segments:
        h = torch.mm(x[a:b].to(dt), lora_a[s])
        y[a:b].add_(torch.mm(h, lora_b[s]))


def add_lora_group(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, g,
                   slices: list[tuple[int, int]] | None = None) -> None:
    """The padded group g (a tessera.lora.manager.PaddedGroup): one bmm pair for every adapter's rows.
    With `slices` (a fused layer's output slices), the expand reads only B's diagonal blocks."""
    a = lora_a if g.slots is None else lora_a.index_select(0, g.slots)
    b = lora_b if g.slots is None else lora_b.index_select(0, g.slots)
    xp = x.index_select(0, g.pad_index).to(a.dtype).view(a.shape[0], g.length, x.shape[1])
    h = torch.bmm(xp, a)
    if slices is None or len(slices) == 1:
        d = torch.bmm(h, b)
    else:
        d = h.new_empty(a.shape[0], g.length, y.shape[1])
        r = a.shape[2] // len(slices)
        for j, (o0, o1) in enumerate(slices):
            d[:, :, o0:o1] = torch.bmm(h[:, :, j * r:(j + 1) * r], b[:, j * r:(j + 1) * r, o0:o1])
    y.index_add_(0, g.rows, d.view(-1, y.shape[1]).index_select(0, g.back_index).to(y.dtype))


def lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   token_slots: torch.Tensor) -> torch.Tensor:
    """The LoRA delta [T, out] row by row in fp32 (the tests' reference for every path)."""
    out = torch.zeros(x.shape[0], lora_b.shape[-1], dtype=torch.float32)
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] = (x[t].float() @ lora_a[s].float()) @ lora_b[s].float()
    return out
