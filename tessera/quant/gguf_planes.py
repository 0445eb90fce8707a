"""GGUF's quantized blocks straight into bit planes, without a round trip through floats.

`quantization="gguf"` keeps a GGUF file's own quantization: each linear weight's blocks become codes,
scales and offsets of tessera's layout (tessera.quant.quantize.QuantizedWeight), and
`QuantizedWeight.dequantize()` then gives exactly what the `gguf` package's dequantization gives
(the tests check it bit for bit):

- Q4_0: w = d * (q - 8)   -> 4-bit code q, scale d, offset -8d  (d * q and 8d are exact in fp32)
- Q4_1: w = d * q + m     -> 4-bit code q, scale d, offset m     (the same two fp32 operations)
- Q8_0: w = d * x, x int8 -> 8-bit code x + 128, scale d, offset -128d

All three use blocks of 32 weights along K, so the group size is 32. Other block types (the
k-quants) are not read here yet: a file with them is refused with the list of what is supported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tessera.errors import UnsupportedModelError
from tessera.quant.bitplanes import pack_planes, padded_k
from tessera.quant.quantize import QuantizedWeight

log = logging.getLogger(__name__)

GROUP = 32
SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")


def blocks_to_quantized(data: np.ndarray, qtype_name: str, n: int, k: int) -> QuantizedWeight:
    """Raw GGUF bytes of an [n, k] weight (n * k / 32 blocks) -> a QuantizedWeight with group 32."""
    if qtype_name not in SUPPORTED:
        raise UnsupportedModelError(f"GGUF block type {qtype_name} cannot be kept quantized yet "
                                    f"(supported: {', '.join(SUPPORTED)}); use quantization='bits:N'")
    if k % GROUP:
        raise UnsupportedModelError(f"a {qtype_name} weight needs K % 32 == 0, got K = {k}")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(n * k // GROUP, -1)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    if qtype_name == "Q8_0":
        codes = raw[:, 2:34].view(np.int8).astype(np.int32) + 128
        bits, offset = 8, -128.0 * d
    else:
        qs = raw[:, 4:20] if qtype_name == "Q4_1" else raw[:, 2:18]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)  # low nibbles: weights 0..15
        bits = 4
        offset = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if qtype_name == "Q4_1" else -8.0 * d
    return _assemble(torch.from_numpy(codes).view(n, k), torch.from_numpy(d).view(n, -1),
                     torch.from_numpy(np.asarray(offset, dtype=np.float32)).view(n, -1), bits, k)


def _assemble(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, k: int) -> QuantizedWeight:
    """Pad the groups to K_pad / 32 (scale and offset 0) and pack the planes."""
    groups = padded_k(k) // GROUP
    pad = groups - scale.shape[1]
    scale = torch.nn.functional.pad(scale, (0, pad)).contiguous()
    offset = torch.nn.functional.pad(offset, (0, pad)).contiguous()
    return QuantizedWeight(pack_planes(codes, bits), scale, offset, bits, GROUP, k)


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation (fused q/k/v or gate/up); a narrower width is widened (same codes)."""
    bits = max(p.bits for p in parts)
    k = parts[0].k
    if any(p.k != k or p.group_size != GROUP for p in parts):
        raise UnsupportedModelError("fused weights must share K and the block size")
    codes = torch.cat([p.codes() for p in parts])
    return _assemble(codes, torch.cat([p.scale for p in parts])[:, : k // GROUP],
                     torch.cat([p.offset for p in parts])[:, : k // GROUP], bits, k)


def permute_rows(qw: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    idx = torch.from_numpy(np.asarray(order, dtype=np.int64))
    return QuantizedWeight(qw.planes[:, idx].contiguous(), qw.scale[idx].contiguous(), qw.offset[idx].contiguous(),
                           qw.bits, qw.group_size, qw.k)


# tessera's fused linear -> the GGUF tensors it is made of, in row order.
_FUSED = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
          "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}


def attach_gguf_weights(model: nn.Module, gguf_path: str | Path, progress: bool = False,
                        lm_head: bool = False) -> int:
    """Give each decoder Linear of `model` its weight from the GGUF file, kept quantized
    (`layer.gguf_qweight`, used by BitsLinearMethod), and with `lm_head` the LM head too (the file's
    `output.weight`, or `token_embd.weight` when the embeddings are tied). Returns how many layers got one."""
    from tqdm.auto import tqdm

    from tessera.models.gguf import _ARCHS, _meta, open_gguf, unpermute_qk

    reader = open_gguf(gguf_path)
    arch = _meta(reader, "general.architecture")
    permuted = _ARCHS.get(arch, (None, None, False))[2]
    heads = {"attn_q": _meta(reader, f"{arch}.attention.head_count"),
             "attn_k": _meta(reader, f"{arch}.attention.head_count_kv")}
    tensors = {t.name: t for t in reader.tensors}
    count = 0
    for i, layer in enumerate(tqdm(model.layers, desc="GGUF blocks -> bit planes", unit="layer",
                                   disable=not progress, leave=False)):
        for module_name, parts in _FUSED.items():
            qws = []
            for part in parts:
                t = tensors.get(f"blk.{i}.{part}.weight")
                if t is None:
                    raise UnsupportedModelError(f"{gguf_path}: no tensor blk.{i}.{part}.weight")
                n, k = (int(s) for s in reversed(t.shape.tolist()))
                qw = blocks_to_quantized(np.asarray(t.data), t.tensor_type.name, n, k)
                if permuted and part in heads:
                    qw = permute_rows(qw, unpermute_qk(np.arange(n)[:, None], int(heads[part]))[:, 0])
                qws.append(qw)
            target = layer.get_submodule(module_name)
            target.gguf_qweight = qws[0] if len(qws) == 1 else stack_rows(qws)
            count += 1
    if lm_head:
        t = tensors.get("output.weight")
        if t is None:
            t = tensors.get("token_embd.weight")
        if t is None:
            raise UnsupportedModelError(f"{gguf_path}: neither output.weight nor token_embd.weight")
        n, k = (int(s) for s in reversed(t.shape.tolist()))
        model.lm_head.gguf_qweight = blocks_to_quantized(np.asarray(t.data), t.tensor_type.name, n, k)
        count += 1
    return count
