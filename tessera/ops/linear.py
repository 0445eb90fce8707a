"""Linear layers with a pluggable way to store and multiply their weights.

`Linear` holds nn.Linear's parameters (weight [out, in], optional bias); a `LinearMethod` decides how
they are multiplied. The method is chosen per device and dtype once the weights are loaded
(`choose_linear_method`), so quantized or parallel linears plug in here, not in the model.

On CPUs, oneDNN's prepacked weights (`mkldnn._reorder_linear_weight` + `_linear_pointwise`, the path
torch.compile's freezing takes) are 1.3-2x `F.linear` at decode batch sizes (M = 16-200) in bf16, where
they use AMX or AVX512-BF16, and up to 1.5x in fp32 (measured on a 2-core Xeon with AMX; see
docs/benchmarks.md). The packed copy is made once at load; the plain weight stays for single fp32 rows
and prefill-sized batches, where the plain GEMM is as fast or faster, and for anything that reads the
weight itself (tied embeddings).
"""

from __future__ import annotations

import logging
import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class LinearMethod:
    """Dense: `F.linear` on the weight as loaded. The default, and what every other method must equal."""

    name = "dense"
    # Its products run shape-dependent kernels only, no host sync: a CUDA graph may capture them.
    graph_safe = True

    def process_weights(self, layer: Linear) -> None:
        """Called once after the weights are loaded (repack, quantize, ...)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def decode_op(self, layer: Linear, stack_cls):
        """The layer's product as the C++ decode stack runs it (tessera/ops/fused_decode.py), or None when
        this method has none; the step then runs the Python layers. A subclass that changes `apply`
        must describe itself here (or return None): the base answers only for plain dense weights."""
        if type(self) is not LinearMethod:
            return None
        return linear_op(stack_cls, 0, layer)

    def fused_step_ok(self) -> bool:
        """Whether this step's product is the one `decode_op` described; a method whose product changes
        from step to step (LoRA's: the base product, plus the adapters of the rows that have one) says
        no on the steps where it differs, and those steps run the Python layers."""
        return True

    def prepare_fused_step(self, stack) -> None:
        """Called before each step the C++ decode stack runs, for methods that answer fused_step_ok:
        hand the stack what this step's product needs beyond the weights (LoRA's row plan)."""


def linear_op(stack_cls, kind: int, layer: Linear, packed=None, tiles=None, dense_from_rows: int = 0,
              gemm_from_rows: int = 0, block_weights: int = 0):
    """A DecodeStack.linear for `layer` (kind 0 dense, 1 oneDNN-packed, 2 bit planes, 3 bit planes with int8
    activations)."""
    empty = layer.weight.new_empty(0)
    tiles, scale, offset = tiles if tiles is not None else (empty, empty, empty)
    return stack_cls.linear(kind, layer.weight, empty if packed is None else packed, tiles, scale, offset,
                            layer.bias, layer.out_features, layer.in_features, dense_from_rows, gemm_from_rows,
                            block_weights)


class OneDNNPackedLinear(LinearMethod):
    """The weight reordered once into oneDNN's blocked layout for this CPU (fp32 or bf16)."""

    name = "onednn-packed"
    batch_hint = 64  # the batch size the blocking is tuned for; any batch size is accepted
    # From here on the plain weight is multiplied (see apply). Paired runs of the default model's four
    # products (30 layers, 2 threads, AMX Xeon): packed 20% faster than plain at 256-320 rows in bf16 and
    # 5-10% in fp32, level at 352, 7-15% slower from 384 (docs/benchmarks.md).
    dense_from_rows = 352

    def process_weights(self, layer: Linear) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), self.batch_hint)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        # A lone fp32 row: MKL's GEMV reads the plain weight faster. Prefill-sized batches: the blocking
        # tuned for batch_hint loses to the plain GEMM (up to 2x at M = 2048 on AMX).
        if rows >= self.dense_from_rows or (rows == 1 and x.dtype == torch.float32):
            return F.linear(x, layer.weight, layer.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), layer.packed_weight, layer.bias,
                                                 "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def decode_op(self, layer: Linear, stack_cls):
        if type(self) is not OneDNNPackedLinear:
            return None
        return linear_op(stack_cls, 1, layer, packed=layer.packed_weight, dense_from_rows=self.dense_from_rows)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method: LinearMethod = DENSE
        self.packed_weight: torch.Tensor | None = None
        self.quantize = True  # False keeps this layer in the compute dtype under a quantizing method
        self.qweight = None  # tessera.quant.QuantizedWeight, when a quantizing method holds the weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        method = self.method.name if self.qweight is not None or self.quantize else "dense (not quantized)"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {method}"


DENSE = LinearMethod()


def choose_linear_method(device: torch.device, dtype: torch.dtype, quantization=None,
                         allow_packing: bool = True) -> LinearMethod:
    """`quantization` (a tessera.quant.QuantSpec): N-bit bit-plane weights, the layers it skips on the
    method below. Otherwise oneDNN-packed weights on CPUs for fp32 and bf16 (where torch has oneDNN),
    dense elsewhere. TESSERA_CPU_LINEAR=dense turns packing off (to compare, or if a CPU misbehaves);
    so does allow_packing=False (a weight budget: the packed copy would double the resident bytes)."""
    if quantization is not None:
        from tessera.quant.bits_linear import BitsLinearMethod

        return BitsLinearMethod(quantization, choose_linear_method(device, dtype, allow_packing=allow_packing))
    forced = os.environ.get("TESSERA_CPU_LINEAR", "")
    if forced not in ("", "dense", "onednn-packed"):
        raise ValueError(f"TESSERA_CPU_LINEAR must be 'dense' or 'onednn-packed', got {forced!r}")
    if not allow_packing:
        return DENSE
    if device.type != "cpu" or forced == "dense" or dtype not in (torch.float32, torch.bfloat16):
        return DENSE
    if not onednn_packs(dtype):
        return DENSE
    return OneDNNPackedLinear()


@cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can reorder a `dtype` weight on this CPU: torch's bf16 reorder needs AVX512-BW/VL/DQ
    or AVX-NE-CONVERT and raises elsewhere (an AVX2-only EPYC), so one tiny weight is tried, once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), OneDNNPackedLinear.batch_hint)
    except RuntimeError as e:
        log.info("oneDNN cannot pack %s weights on this CPU (%s); dense F.linear", dtype, e)
        return False
    return True


def prepare_linears(model: nn.Module, method: LinearMethod, progress: bool = False) -> LinearMethod:
    """Give every Linear of `model` the method; falls back to dense (logged) if the method cannot
    prepare a weight on this machine. `progress` shows a bar (quantizing takes a while)."""
    from tqdm import tqdm

    from tessera.heap import trim_heap

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    try:
        for layer in tqdm(layers, desc=f"preparing linears ({method.name})", unit="layer", leave=False,
                          disable=not progress):
            method.process_weights(layer)
            if layer.qweight is not None:
                # Quantizing or tiling frees the layer's transients (its dense or canonical copy): hand them
                # back now, or glibc keeps them resident and the peak holds every layer's twice.
                trim_heap()
    except RuntimeError as e:
        if any(layer.qweight is not None for layer in layers):
            raise  # quantized layers have no dense weight left to fall back on
        log.warning("linear method %s unavailable here (%s); using dense F.linear", method.name, e)
        method = DENSE
        for layer in layers:
            layer.packed_weight = None
    for layer in layers:
        layer.method = method
    return method
