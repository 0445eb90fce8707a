"""Quantized decoder layers in the layer pack: their layout, how a region is filled, and the layer shell that
multiplies straight out of a stream buffer.

A quantized linear is stored in a region as the C++ bit-plane kernel's own layout (what BitsLinearMethod
keeps as `layer.qtiles`: tiles uint8 [N_pad / 16, K_pad / 8, bits, 16], scale and offset fp32
[N_pad / 16, groups, 16]; tessera.quant.bitplanes.tile_planes), so a streamed layer is usable the moment
its bytes are in: no unpacking, no dequantized copy. Everything else of the layer (norms, biases, a linear
a GGUF kept in floats) is in the compute dtype, as in a dense region. The slot names say which is which:
`<linear>.qtiles.tiles|scale|offset` for a quantized linear, the parameter's name otherwise.

Which linears are quantized, and to how many bits in groups of how many weights, is a `LinearTable`
(suffix inside the layer -> (bits, group_size)): from `quantization="bits:N"` every linear the quantizing
method quantizes gets N bits; from a tessera quantized checkpoint (tessera.quant.checkpoint; GGUF files kept
quantized come as one) each layer's own entries, which may differ between layers.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.offload.layer_pack import LayerLayout
from tessera.ops.linear import Linear, LinearMethod
from tessera.quant.bitplanes import TILE_ROWS, padded_k, tile_weight_into
from tessera.quant.quantize import QuantizedWeight

LinearTable = dict[str, tuple[int, int]]  # "self_attn.qkv_proj" -> (bits, group_size)
PARTS = ("tiles", "scale", "offset")


def quantizable_linears(layer: nn.Module) -> list[str]:
    """The linears of a decoder layer a quantizing method quantizes (tessera.ops.linear.Linear.quantize)."""
    return [name for name, m in layer.named_modules() if isinstance(m, Linear) and m.quantize]


def tile_shapes(n: int, k: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of a [n, k] linear's tiles, scale and offset in the kernel's layout."""
    tiles, kp = -(-n // TILE_ROWS), padded_k(k)
    return {"tiles": (tiles, kp // 8, bits, TILE_ROWS), "scale": (tiles, kp // group_size, TILE_ROWS),
            "offset": (tiles, kp // group_size, TILE_ROWS)}


def quantized_layout(layer: nn.Module, dtype: torch.dtype, linears: LinearTable) -> LayerLayout:
    """The region layout of `layer` (a DecoderLayer, on meta) with `linears` quantized, the rest in `dtype`."""
    tensors = []
    for name, p in layer.named_parameters():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in linears:
            bits, group = linears[module]
            n, k = p.shape
            for part, shape in tile_shapes(n, k, bits, group).items():
                tensors.append((f"{module}.qtiles.{part}", shape, torch.uint8 if part == "tiles" else torch.float32))
        else:
            tensors.append((name, tuple(p.shape), dtype))
    return LayerLayout.build(tensors)


def layout_linears(layout: LayerLayout) -> dict[str, dict[str, torch.Size]]:
    """The quantized linears of a layout: suffix -> {part: shape}."""
    out: dict[str, dict] = {}
    for s in layout.slots:
        module, sep, part = s.name.rpartition(".qtiles.")
        if sep:
            out.setdefault(module, {})[part] = s.shape
    return out


def fill_quantized(views: dict[str, torch.Tensor], module: str, qw: QuantizedWeight) -> None:
    """Write `qw` (canonical planes) into the region's slots of linear `module`, in the kernel's layout (a
    block of rows at a time: tessera.quant.bitplanes.tile_weight_into)."""
    tiles, scale, offset = (views[f"{module}.qtiles.{part}"] for part in PARTS)
    if tuple(tiles.shape) != tile_shapes(qw.n, qw.k, qw.bits, qw.group_size)["tiles"] or \
            scale.shape[1] != qw.scale.shape[1]:
        raise ValueError(f"{module}: a {qw.bits}-bit [{qw.n}, {qw.k}] weight in groups of {qw.group_size} does "
                         f"not fit its slots {tuple(tiles.shape)}")
    tile_weight_into(qw.planes, qw.scale, qw.offset, tiles, scale, offset)


def bind_quantized(layer: nn.Module, layout: LayerLayout, views: dict[str, torch.Tensor],
                   method: LinearMethod, dtype: torch.dtype) -> None:
    """Make the quantized linears of `layer` (on meta) multiply by their slots' views with `method` (a
    BitsLinearMethod); what BitsLinearMethod.process_weights leaves on a resident layer, without the copy."""
    for module, shapes in layout_linears(layout).items():
        lin = layer.get_submodule(module)
        tiles = views[f"{module}.qtiles.tiles"]
        bits, groups = shapes["tiles"][2], shapes["scale"][1]
        group = padded_k(lin.in_features) // groups
        lin.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)  # as process_weights leaves it
        lin.qtiles = (tiles, views[f"{module}.qtiles.scale"], views[f"{module}.qtiles.offset"])
        # The canonical planes are not kept (BitsLinearMethod.canonical rebuilds them from the tiles).
        n = lin.out_features
        lin.qweight = QuantizedWeight(torch.empty(bits, n, 0, dtype=torch.uint8), torch.empty(n, 0),
                                      torch.empty(n, 0), bits, group, lin.in_features)
        lin.method = method


def quantized_bytes(n: int, k: int, bits: int, group_size: int) -> int:
    """A [n, k] linear's resident bytes in the kernel's layout (tiles + fp32 scale and offset)."""
    shapes = tile_shapes(n, k, bits, group_size)
    return (torch.Size(shapes["tiles"]).numel() + 8 * torch.Size(shapes["scale"]).numel())
