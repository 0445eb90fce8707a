"""BitsLinearMethod: the Linear seam (tessera/ops/linear.py) for N-bit bit-plane weights.

Each quantizable Linear is quantized once at load (tessera.quant.quantize) and its dense weight is
released; the product then reads the planes in place (the C++ kernel `bitplane_linear` on CPUs).
Layers marked `quantize = False` stay in the compute dtype with the fallback method: the LM head,
which ties to the embedding matrix in most small models, unless `quantize_lm_head` is set (the
embeddings are a lookup, never a product, and stay dense in any case).

On CUDA devices the weight is kept in the Triton kernels' layout instead (tessera.ops.triton.
bitplane_linear: K-major int32 plane words, `layer.qgpu`) and multiplied by them. TESSERA_BITS_KERNEL=
triton forces that layout and those kernels on CPU layers too (for tests under TRITON_INTERPRET=1).
Where no kernel is available (no compiler, or no triton), the product dequantizes the layer's weight
per call: correct, slow, and logged once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import InvalidRequestError
from tessera.ops.linear import Linear, LinearMethod, linear_op
from tessera.quant.bitplanes import tile_weight, untile_group_params, untile_planes
from tessera.quant.kernel_choice import tune_bitplane_kernels
from tessera.quant.quantize import QuantizedWeight, QuantSpec, quantize_weight

log = logging.getLogger(__name__)


class BitsLinearMethod(LinearMethod):
    graph_safe = False  # its Triton path has not run under a CUDA graph capture yet

    def __init__(self, spec: QuantSpec, fallback: LinearMethod):
        self.spec = spec
        self.fallback = fallback
        self.name = ("gguf blocks as bit planes" if spec.method == "gguf"
                     else f"bits:{spec.bits} (group {spec.group_size}, {spec.method})")
        if spec.activation_bits:
            self.name += f", int{spec.activation_bits} activations"
        self._warned = False
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # _dequantized's buffer, per dtype

    def process_weights(self, layer: Linear) -> None:
        if not getattr(layer, "quantize", True):
            self.fallback.process_weights(layer)
            return
        w = layer.weight
        qw = layer.__dict__.pop("loaded_qweight", None)  # from a quantized checkpoint (tessera.quant.checkpoint)
        if qw is None and self.spec.method == "gguf":  # a float tensor of the GGUF: it stays dense
            self.fallback.process_weights(layer)
            return
        if self.spec.activation_bits and (_triton_layout(w.device) or _cpu_kernels() is None):  # before any work
            raise InvalidRequestError("activation_bits=8 needs tessera's CPU kernels (a C++ compiler) and a CPU device")
        if qw is None:
            qw = quantize_weight(w.detach().cpu(), self.spec)  # packing is CPU code; a GPU layer comes back
        layer.qweight = qw
        if _triton_layout(w.device):  # the Triton kernels' layout, on the layer's device
            from tessera.ops.triton.bitplane_linear import to_gpu_layout

            layer.qgpu = to_gpu_layout(qw, w.device)
        else:  # the C++ kernel's layout (tessera.quant.bitplanes.tile_planes, a block of rows at a time)
            layer.qtiles = tile_weight(qw.planes, qw.scale, qw.offset)
            # bf16 x: which kernel takes few planes on this CPU (once per process); int8 activations take neither
            kernels = _cpu_kernels() if w.dtype == torch.bfloat16 and not self.spec.activation_bits else None
            if kernels is not None:
                tune_bitplane_kernels(kernels)
        # Drop the canonical copies; canonical() rebuilds them from the tiles when needed. Fresh empty
        # tensors, not [:, :0] views: a view, even of no elements, would keep the whole storage alive.
        qw.planes, qw.scale, qw.offset = (t.new_empty(*t.shape[:-1], 0) for t in (qw.planes, qw.scale, qw.offset))
        # The dense copy goes: the planes are the weight now (a 0-element tensor keeps dtype and device).
        layer.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        qw: QuantizedWeight | None = getattr(layer, "qweight", None)
        if qw is None:
            return self.fallback.apply(layer, x)
        qgpu = getattr(layer, "qgpu", None)
        if qgpu is not None:
            from tessera.ops.triton.bitplane_linear import bitplane_linear

            return bitplane_linear(x, qgpu, layer.bias)
        rows = x.numel() // x.shape[-1]
        kernels = _cpu_kernels() if x.device.type == "cpu" else None
        if kernels is None:
            if not self._warned:
                log.warning("bits linear: no kernel for %s here; dequantizing each layer per call (slow)", x.device)
                self._warned = True
            return F.linear(x, canonical(layer).dequantize().to(x.device, x.dtype), layer.bias)
        tiles, scale, offset = layer.qtiles
        x2 = x.reshape(rows, x.shape[-1])
        # Prefill-sized steps of bf16/fp16 x (with int8 activations too: there the integer kernel, which
        # builds each weight's codes once per 8 rows of x, lost to the dequantized weight and torch's GEMM)
        if rows >= self.dense_from_rows and x.dtype != torch.float32:
            w = self._dequantized(kernels, layer, x.dtype)
            if w is not None:
                return F.linear(x, w.t(), layer.bias)
        out = x.new_empty(rows, layer.out_features)
        if self.spec.activation_bits:  # int8 activations: the integer kernel at every other batch size
            kernels.bitplane_linear(out, x2, tiles, scale, offset, layer.out_features, layer.bias,
                                    self.spec.activation_bits)
            return out.view(*x.shape[:-1], layer.out_features)
        if rows >= self.gemm_rows(layer, x.dtype, kernels):
            kernels.bitplane_gemm(out, x2, tiles, scale, offset, layer.out_features, layer.bias, self.block_weights)
        else:
            kernels.bitplane_linear(out, x2, tiles, scale, offset, layer.out_features, layer.bias)
        return out.view(*x.shape[:-1], layer.out_features)

    def _dequantized(self, kernels, layer: Linear, dtype: torch.dtype) -> torch.Tensor | None:
        """The layer's whole weight dequantized, as [in, out] in `dtype`, in a scratch buffer shared by every
        layer (each prefill-sized product overwrites it: the buffer lives only until the GEMM that reads it),
        or None for a layer larger than scratch_max_weights (it keeps the batched kernel)."""
        k, n = layer.in_features, layer.out_features
        if k * n > self.scratch_max_weights:
            return None
        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.numel() < k * n:
            scratch = self._scratch[dtype] = torch.empty(k * n, dtype=dtype)
        w = scratch[:k * n].view(k, n)
        tiles, scale, offset = layer.qtiles
        kernels.bitplane_dequantize_t(w, tiles, scale, offset, 0)
        return w

    def decode_op(self, layer: Linear, stack_cls):
        if type(self) is not BitsLinearMethod:
            return None
        if getattr(layer, "qweight", None) is None:
            return self.fallback.decode_op(layer, stack_cls)
        if getattr(layer, "qgpu", None) is not None:  # the Triton kernels' layout: not the C++ stack's
            return None
        if self.spec.activation_bits:  # kind 3: the integer kernel at every decode batch size (decode steps, like
            # kind 2's, never take the dense path of prefill-sized steps)
            return linear_op(stack_cls, 3, layer, tiles=layer.qtiles)
        return linear_op(stack_cls, 2, layer, tiles=layer.qtiles,
                         gemm_from_rows=self.gemm_rows(layer, layer.weight.dtype, _cpu_kernels()),
                         block_weights=self.block_weights)

    def gemm_rows(self, layer: Linear, dtype: torch.dtype, kernels) -> int:
        """The rows of x from which `bitplane_gemm` takes the product: `brgemm_from_rows` where it runs AMX
        brgemm (bf16 x, K a whole number of tiles' columns); for other bf16 x at the widths the dot-product
        kernel takes, the crossover timed on this CPU (tessera.quant.kernel_choice); `gemm_from_rows`
        elsewhere."""
        padded_k = layer.qtiles[0].shape[1] * 8
        if dtype != torch.bfloat16:
            return self.gemm_from_rows
        if kernels._bitplane_gemm_uses_brgemm():
            return self.brgemm_from_rows if padded_k == layer.in_features else self.gemm_from_rows
        choice = tune_bitplane_kernels(kernels)  # timed once per kernel build (tessera.quant.kernel_choice)
        bits = layer.qtiles[0].shape[2]
        if choice.bf16_gemm_from_rows is not None and choice.dp_min_bits <= bits <= 4:
            return choice.bf16_gemm_from_rows
        return self.gemm_from_rows

    # The lookup kernel's cost grows with the rows of x; from this many rows on, `bitplane_gemm`
    # (csrc/bitplane_gemm.cpp) takes over: blocks of weight rows dequantized into a small buffer and
    # multiplied by a GEMM (torch's AMX brgemm on a 32-row VNNI block in L2 for bf16 x where it runs, else
    # blocks of `block_weights` weights and at::linear). The planes are still what is stored; no whole
    # dense matrix is ever made.
    gemm_from_rows = 16
    # Where bitplane_gemm runs AMX brgemm, its cost barely moves from 1 to 64 rows (a block's dequantization,
    # ~0.65 ms a layer of the default model at 4 bits on the 2-core Xeon), while the lookup kernel's grows with
    # every row: paired runs put the two level at 5-6 rows for 2, 3 and 4 bits, the GEMM path 1.4x faster at 8
    # rows and 2x at 12 (docs/benchmarks.md). fp32 x (the blockwise at::linear path) crosses at 16-24.
    brgemm_from_rows = 6
    block_weights = 1 << 20  # weights dequantized per block on the at::linear path (4 MiB in fp32)
    # From this many rows of bf16/fp16 x (prefill chunks), the whole weight is dequantized once into a
    # scratch buffer and multiplied by torch's GEMM: the batched kernel multiplies 32-64-row weight blocks, each
    # against every row of x, so x is read once per block, and once x outgrows L2 (~1,000 rows of 576) that
    # made it 1.7-2x slower than the bf16 GEMM (2 threads, 2048 rows, one layer's four products: 30.6 ms
    # against 18.2 ms; the dequantization adds about 0.6 ms). fp32 x already takes the blockwise
    # dequantize + at::linear path in the kernel.
    dense_from_rows = 1024
    scratch_max_weights = 1 << 23  # larger layers (a big LM head) keep the batched kernel: no 16+ MiB buffer


def canonical(layer: Linear) -> QuantizedWeight:
    """The layer's weight as a QuantizedWeight with canonical planes (rebuilt from the kernel layout)."""
    qw = layer.qweight
    if getattr(layer, "qgpu", None) is not None:
        from tessera.ops.triton.bitplane_linear import from_gpu_layout

        return from_gpu_layout(layer.qgpu)
    tiles, scale, offset = layer.qtiles
    n = layer.out_features
    return QuantizedWeight(untile_planes(tiles, n), untile_group_params(scale, n), untile_group_params(offset, n),
                           qw.bits, qw.group_size, qw.k)


def _triton_layout(device: torch.device) -> bool:
    """Whether a layer on `device` keeps the Triton kernels' layout: on CUDA when triton is installed (else
    the C++ layout, on the CPU, for the dequantizing fallback), or anywhere when forced."""
    import os

    forced = os.environ.get("TESSERA_BITS_KERNEL", "")
    if forced not in ("", "triton"):
        raise ValueError(f"TESSERA_BITS_KERNEL must be unset or 'triton', got {forced!r}")
    if forced and not _has_triton():
        raise RuntimeError("TESSERA_BITS_KERNEL=triton needs triton installed")
    return bool(forced) or (device.type == "cuda" and _has_triton())


def _has_triton() -> bool:
    from tessera.ops.triton import HAS_TRITON

    return HAS_TRITON


def _cpu_kernels():
    from tessera.ops.cpu_kernels import cpu_kernels

    return cpu_kernels()


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of quantized planes + scales and offsets, bytes of the dense parameters left): the weights
    resident (the scales and offsets are fp32, 8 bytes per group: 1 bit per weight at group 64, 2 at 32)."""
    def packed(m) -> int:
        if getattr(m, "qgpu", None) is not None:
            return m.qgpu.nbytes
        return sum(t.numel() * t.element_size() for t in m.qtiles)

    q = sum(packed(m) for m in model.modules() if getattr(m, "qweight", None) is not None)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return q, dense
