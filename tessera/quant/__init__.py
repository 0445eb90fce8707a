"""N-bit weights as bit planes (bipolar-INT): storage, quantizers, and the Linear method."""

from tessera.quant.bitplanes import pack_planes, unpack_planes
from tessera.quant.quantize import QuantizedWeight, QuantSpec, quantize_weight

__all__ = ["QuantSpec", "QuantizedWeight", "pack_planes", "quantize_weight", "unpack_planes"]
