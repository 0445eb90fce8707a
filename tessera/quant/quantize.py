"""Weight quantization to N-bit codes in groups along the input dimension.

Every group of `group_size` consecutive weights of a row shares a scale d and an offset m; a weight is
w ~ d * q + m with q an N-bit code, stored as bit planes (tessera.quant.bitplanes). Two ways to choose
q, d and m, both calibration-free:

- "rtn": round to nearest over the group's [min, max] range (m = min, d = range / (2^N - 1));
- "hqq": Half-Quadratic Quantization (Badri & Shaji, 2023), which starts from RTN and refines the
  offset by a proximal solver of an l_p<1 error on the dequantized weights. It helps most at low
  widths. The solver is the `hqq` package's (`optimize_weights_proximal_legacy`), the reference
  implementation; tessera only adapts its (scale, zero) convention, w = (q - zero) / scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.errors import InvalidRequestError
from tessera.quant.bitplanes import pack_planes, padded_k, unpack_planes

METHODS = ("rtn", "hqq")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64
    method: str = "rtn"
    # 8: the products quantize each row of activations to int8 per group and sum codes x int8 exactly
    # (ops/csrc/bitplane_i8.h; llama.cpp's Q8 activations); 0: exact products of the activations as given.
    # A runtime choice, not part of the stored weights.
    activation_bits: int = 0

    @classmethod
    def parse(cls, text: str, group_size: int = 64, method: str = "rtn") -> QuantSpec:
        """'bits:N' (N in 1..8), or 'gguf' (keep a GGUF file's own blocks, tessera.quant.gguf_planes),
        as `LLM(quantization=...)` and `--quantization` take it."""
        if text == "gguf":
            return cls(0, 32, "gguf")
        kind, _, n = (text or "").partition(":")
        if kind != "bits" or not n.isdigit() or not 1 <= int(n) <= 8:
            raise InvalidRequestError(f"quantization must be 'bits:N' with N in 1..8, or 'gguf', got {text!r}")
        spec = cls(int(n), group_size, method)
        spec.validate()
        return spec

    def with_activations(self, activation_bits: int | None) -> QuantSpec:
        """This spec with the products' activation width (None or 0: exact), validated."""
        from dataclasses import replace

        if activation_bits not in (None, 0, 8):
            raise InvalidRequestError(f"activation_bits must be 8 (int8 activations) or unset, got {activation_bits!r}")
        return replace(self, activation_bits=activation_bits or 0)

    def validate(self) -> None:
        # Multiples of 16 (a kernel vector never straddles two groups), dividing 64 or multiples of it
        # (a 64-weight plane word never straddles two groups' padding).
        if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size % 16:
            raise InvalidRequestError(f"quantization group size must be a multiple of 16, got {self.group_size!r}")
        if self.group_size % 64 and 64 % self.group_size:
            raise InvalidRequestError("quantization group size must divide 64 or be a multiple of it, "
                                      f"got {self.group_size}")
        if self.method not in METHODS:
            raise InvalidRequestError(f"quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "hqq":
            import importlib.util

            if importlib.util.find_spec("hqq") is None:
                raise InvalidRequestError("quantization method hqq needs the hqq package: "
                                          "pip install 'tessera-llm[quant]'")


@dataclass
class QuantizedWeight:
    """A [n, k] weight as bit planes plus per-group scale and offset (fp32, [n, k_pad / group_size]).
    Padded columns have code 0, scale 0 and offset 0, so they contribute nothing."""

    planes: torch.Tensor  # uint8 [bits, n, k_pad / 8]
    scale: torch.Tensor   # float32 [n, groups]
    offset: torch.Tensor  # float32 [n, groups]
    bits: int
    group_size: int
    k: int

    @property
    def n(self) -> int:
        return self.planes.shape[1]

    def codes(self) -> torch.Tensor:
        return unpack_planes(self.planes, self.k)

    @classmethod
    def cat_rows(cls, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Row-wise concatenation of weights of one width, group and K (the parts of a fused q/k/v or
        gate/up, or row blocks quantized one by one): the weight of the concatenated matrix."""
        first = parts[0]
        if any((p.bits, p.group_size, p.k) != (first.bits, first.group_size, first.k) for p in parts):
            raise ValueError("cat_rows needs parts of one width, group size and K")
        if len(parts) == 1:
            return first
        return cls(torch.cat([p.planes for p in parts], dim=1), torch.cat([p.scale for p in parts]),
                   torch.cat([p.offset for p in parts]), first.bits, first.group_size, first.k)

    def dequantize(self) -> torch.Tensor:
        """fp32 [n, k]: d * q + m, computed in fp32 (what the kernels must equal up to summation order)."""
        q = unpack_planes(self.planes, self.planes.shape[2] * 8).to(torch.float32)
        g = self.group_size
        w = q.view(self.n, -1, g) * self.scale[..., None] + self.offset[..., None]
        return w.view(self.n, -1)[:, : self.k]


def grouped_width(k: int, group_size: int) -> int:
    """K padded for the planes (padded_k) and then to whole groups: the width of codes, scales and kernels."""
    return (padded_k(k) + group_size - 1) // group_size * group_size


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """w [n, k] fp32 -> [n, groups, group_size], padded by repeating the last column (so padding never
    widens the last group's range); also the padded width."""
    n, k = w.shape
    kp = grouped_width(k, group_size)
    if kp != k:
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1)
    return w.view(n, kp // group_size, group_size), kp


# Round to nearest treats every row alone, so a large weight is quantized a block of rows at a time into
# the whole weight's planes, scales and offsets: the same codes, with fp32 and int32 working copies of a
# block (~1 MiB each; a dozen are alive at once) instead of the whole matrix (a 7B model's fused gate/up would
# take ~2 GB of them), and no second copy of the quantized result (no concatenation of the blocks').
RTN_BLOCK_WEIGHTS = 1 << 18


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize one [n, k] weight (any float dtype; computed in fp32)."""
    n, k = w.shape
    rows = max(1, RTN_BLOCK_WEIGHTS // max(k, 1))
    if spec.method != "rtn" or n <= rows:
        return _quantize_block(w, spec)
    first = _quantize_block(w[:rows], spec)
    out = QuantizedWeight(first.planes.new_empty(spec.bits, n, first.planes.shape[2]),
                          first.scale.new_empty(n, first.scale.shape[1]),
                          first.offset.new_empty(n, first.offset.shape[1]), spec.bits, spec.group_size, k)
    for r in range(0, n, rows):
        block = first if r == 0 else _quantize_block(w[r:r + rows], spec)
        out.planes[:, r:r + rows].copy_(block.planes)
        out.scale[r:r + rows].copy_(block.scale)
        out.offset[r:r + rows].copy_(block.offset)
    return out


def _quantize_block(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    n, k = w.shape
    wg, kp = _groups(w.detach().to(torch.float32), spec.group_size)
    qmax = (1 << spec.bits) - 1
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.method == "rtn":
        q = (wg - lo[..., None]).div_(scale[..., None]).round_().clamp_(0, qmax)  # in place: one working copy
        offset = lo
    else:
        from hqq.core.optimize import optimize_weights_proximal_legacy

        flat = wg.reshape(-1, spec.group_size)
        inv = (1.0 / scale).reshape(-1, 1)
        zero = (-lo.reshape(-1, 1)) * inv
        q, inv, zero = optimize_weights_proximal_legacy(flat, inv, zero, min_max=[0, qmax], axis=1)
        q = q.view_as(wg)
        scale = (1.0 / inv).view_as(lo)
        offset = (-zero / inv).view_as(lo)
    codes = q.to(torch.int32).view(n, kp)
    # Columns past k: code 0, and a group made only of padding gets scale 0 and offset 0.
    codes[:, k:] = 0
    real = (torch.arange(kp // spec.group_size) * spec.group_size) < k
    scale = torch.where(real, scale, torch.zeros_like(scale)).contiguous()
    offset = torch.where(real, offset, torch.zeros_like(offset)).contiguous()
    planes = pack_planes(codes, spec.bits)  # kp is a multiple of 64 (group sizes divide 64 or are multiples)
    return QuantizedWeight(planes, scale.float(), offset.float(), spec.bits, spec.group_size, k)


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] as the int8-activation kernel (ops/csrc/bitplane_i8.h) rounds them: zero-padded to
    the weights' padded K, per group of `group_size` a scale amax / 127 and codes round_half_even(x * (127 / amax)),
    all in fp32. Returns (codes int32 [M, K_pad], scales fp32 [M, groups]); x ~ codes * scale."""
    m, k = x.shape
    xp = torch.zeros(m, grouped_width(k, group_size), dtype=torch.float32)
    xp[:, :k] = x.float()
    g = xp.view(m, -1, group_size)
    amax = g.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int32)
    return codes.view(m, -1), amax / torch.tensor(127.0)
