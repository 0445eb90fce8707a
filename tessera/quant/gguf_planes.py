"""GGUF's quantized blocks straight into bit planes, without a round trip through floats.

`quantization="gguf"` keeps a GGUF file's own quantization: each linear weight's blocks become codes,
scales and offsets of tessera's layout (tessera.quant.quantize.QuantizedWeight), and
`QuantizedWeight.dequantize()` then gives exactly what the `gguf` package's dequantization gives
(the tests check it bit for bit for every type below). Every GGML block type of this kind is an
affine map of an unsigned code per group, w = scale * q + offset:

| type | bits | group | scale | offset |
|------|------|-------|-------|--------|
| Q4_0 | 4 | 32 | d | -8 d |
| Q4_1 | 4 | 32 | d | m |
| Q5_0 | 5 | 32 | d | -16 d |
| Q5_1 | 5 | 32 | d | m |
| Q8_0 | 8 | 32 | d | -128 d (code x + 128 for the int8 x) |
| Q2_K | 2 | 16 | d * sc (4-bit sc) | -dmin * m (4-bit m) |
| Q3_K | 3 | 16 | d * (sc - 32) (6-bit sc) | -4 d (sc - 32) |
| Q4_K | 4 | 32 | d * sc (6-bit sc) | -dmin * m (6-bit m) |
| Q5_K | 5 | 32 | d * sc | -dmin * m |
| Q6_K | 6 | 16 | d * sc (int8 sc) | -32 d sc |

Why exact: d is fp16 (11 significant bits) and the sub-scales are at most 8 bits, so d * sc, code *
scale and 2^j * scale are all exact in fp32, and the one rounding left (the final add for the types
with a separate minimum) is the same fp32 operation the gguf package does. A fused weight whose parts
differ (a Q4_K_M file stores some attn_v / ffn_down as Q6_K) is widened to the largest width and the
smallest group (a group's parameters repeated): the same values. Other types (the IQ families, ternary)
are not affine per group; they are refused with the list of what is supported.
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.errors import UnsupportedModelError
from tessera.quant.bitplanes import pack_planes, padded_k
from tessera.quant.quantize import QuantizedWeight

QK_K = 256  # weights per k-quant super-block
# type -> (bits, group, weights per block)
LAYOUTS = {"Q4_0": (4, 32, 32), "Q4_1": (4, 32, 32), "Q5_0": (5, 32, 32), "Q5_1": (5, 32, 32),
           "Q8_0": (8, 32, 32), "Q2_K": (2, 16, QK_K), "Q3_K": (3, 16, QK_K), "Q4_K": (4, 32, QK_K),
           "Q5_K": (5, 32, QK_K), "Q6_K": (6, 16, QK_K)}


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row -> fp32 [rows]."""
    return raw.copy().view(np.float16).astype(np.float32)[:, 0]


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Bytes [b, c * run] -> 4-bit values [b, c * 2 * run]: per run of `run` bytes, the low nibbles
    then the high nibbles (the order every GGML 4-bit layout uses)."""
    b = qs.shape[0]
    return ((qs.reshape(b, -1, 1, run) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(b, -1)


def _bit_fields(q: np.ndarray, run: int, width: int) -> np.ndarray:
    """Bytes [b, c * run] -> `width`-bit fields, per run of bytes the field at shift 0, width, 2 width...
    (GGML's 2-bit quants and high-bit masks)."""
    b = q.shape[0]
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((q.reshape(b, -1, 1, run) >> shifts) & ((1 << width) - 1)).reshape(b, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit minima (llama.cpp's get_scale_min_k4)."""
    b = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(b, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(b, 8)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(b, 8)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(raw: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks [b, bytes] -> codes [b, weights], scale and offset [b, groups] (fp32)."""
    b = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(raw[:, :2])[:, None]
        if qtype == "Q8_0":
            return raw[:, 2:34].view(np.int8).astype(np.int32) + 128, d, -128.0 * d
        has_min = qtype.endswith("_1")
        rest = raw[:, 4:] if has_min else raw[:, 2:]
        if qtype.startswith("Q5"):  # 32 high bits (one uint32, little-endian) before the nibbles
            high = np.unpackbits(rest[:, :4], axis=1, bitorder="little")
            codes = _nibbles(rest[:, 4:], 16) | (high << 4)
        else:
            codes = _nibbles(rest, 16)
        centre = 16.0 if qtype.startswith("Q5") else 8.0
        offset = _f16(raw[:, 2:4])[:, None] if has_min else -centre * d
        return codes.astype(np.int32), d, offset
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw[:, 0:2])[:, None], _f16(raw[:, 2:4])[:, None]
        sc, mn = _k_scale_min(raw[:, 4:16])
        if qtype == "Q4_K":
            codes = _nibbles(raw[:, 16:144], 32)
        else:
            codes = _nibbles(raw[:, 48:176], 32) | (_bit_fields(raw[:, 16:48], 32, 1) << 4)
        return codes.astype(np.int32), d * sc, -(dmin * mn)
    if qtype == "Q6_K":
        ql, qh, sc = raw[:, :128], raw[:, 128:192], raw[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(raw[:, 208:210])[:, None]
        codes = _nibbles(ql, 64).reshape(b, 2, 128) | (_bit_fields(qh, 32, 2).reshape(b, 2, 128) << 4)
        scale = d * sc
        return codes.reshape(b, QK_K).astype(np.int32), scale, -32.0 * scale
    if qtype == "Q2_K":
        sc = raw[:, :16]
        d, dmin = _f16(raw[:, 80:82])[:, None], _f16(raw[:, 82:84])[:, None]
        codes = _bit_fields(raw[:, 16:80], 32, 2)
        return codes.astype(np.int32), d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))
    if qtype == "Q3_K":
        hmask, qs, packed = raw[:, :32], raw[:, 32:96], raw[:, 96:108]
        d = _f16(raw[:, 108:110])[:, None]
        low = _nibbles(packed[:, :8], 8)  # scales 0-7: low nibbles, 8-15: high nibbles
        high = _bit_fields(packed[:, 8:12], 4, 2)
        sc = (low | (high << 4)).astype(np.int8).astype(np.float32) - 32.0
        # A set high-mask bit means no -4 (llama.cpp's dequantize_row_q3_K): code = low 2 bits + 4 * bit.
        codes = _bit_fields(qs, 32, 2) | (_bit_fields(hmask, 32, 1) << 2)
        scale = d * sc
        return codes.astype(np.int32), scale, -4.0 * scale
    raise AssertionError(f"no decoder for {qtype}, which LAYOUTS lists")  # blocks_to_quantized checked it


def blocks_to_quantized(data: np.ndarray, qtype_name: str, n: int, k: int) -> QuantizedWeight:
    """Raw GGUF bytes of an [n, k] weight -> a QuantizedWeight with the type's own width and group."""
    if qtype_name not in LAYOUTS:
        raise UnsupportedModelError(f"GGUF block type {qtype_name} cannot be kept quantized yet "
                                    f"(supported: {', '.join(LAYOUTS)}); use quantization='bits:N'")
    bits, group, per_block = LAYOUTS[qtype_name]
    if k % per_block:
        raise UnsupportedModelError(f"a {qtype_name} weight needs K % {per_block} == 0, got K = {k}")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(n * k // per_block, -1)
    codes, scale, offset = _decode(raw, qtype_name)
    return _assemble(torch.from_numpy(np.ascontiguousarray(codes)).view(n, k),
                     torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).view(n, -1),
                     torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32)).view(n, -1), bits, group, k)


def _assemble(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group: int,
              k: int) -> QuantizedWeight:
    """Pad the groups to K_pad / group (scale and offset 0) and pack the planes."""
    groups = padded_k(k) // group
    pad = groups - scale.shape[1]
    scale = torch.nn.functional.pad(scale, (0, pad)).contiguous()
    offset = torch.nn.functional.pad(offset, (0, pad)).contiguous()
    return QuantizedWeight(pack_planes(codes, bits), scale, offset, bits, group, k)


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation (fused q/k/v or gate/up): the widest width and the smallest group (a
    narrower code is the same code; a larger group's parameters repeat over its smaller groups)."""
    bits = max(p.bits for p in parts)
    group = min(p.group_size for p in parts)
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise UnsupportedModelError("fused weights must share K")
    groups = -(-k // group)

    def regroup(t: torch.Tensor, p: QuantizedWeight) -> torch.Tensor:
        return t.repeat_interleave(p.group_size // group, dim=1)[:, :groups]

    codes = torch.cat([p.codes() for p in parts])
    return _assemble(codes, torch.cat([regroup(p.scale, p) for p in parts]),
                     torch.cat([regroup(p.offset, p) for p in parts]), bits, group, k)


def permute_rows(qw: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    idx = torch.from_numpy(np.asarray(order, dtype=np.int64))
    return QuantizedWeight(qw.planes[:, idx].contiguous(), qw.scale[idx].contiguous(), qw.offset[idx].contiguous(),
                           qw.bits, qw.group_size, qw.k)
