"""The kernels that run a step, chosen once per device: one backend object instead of branches in the
runner and the model.

A backend builds each step's attention metadata from the runner's generic description of the flat
batch (`StepLayout`) and runs the layer pieces that have device-specific kernels: RMSNorm (with the
residual add), SiLU-and-multiply, RoPE plus the K/V cache write, and paged attention.

- `TorchBackend`: plain torch ops, the portable reference. Decodes attend as one batched SDPA over their
  gathered context; prefill chunks as SDPA over themselves and their cached prefix, merged by LSE.
- `CpuKernelBackend`: tessera's C++ kernels (tessera/ops/csrc, built once per CPU): paged decode
  attention reading K/V straight from the blocks, fused add+RMSNorm, SiLU-and-mul and RoPE, in fp32,
  bf16 and fp16. Prefill attention stays torch's flash kernel for CPUs.
- `TritonBackend`: the GPU kernels (tessera/ops/triton), the ragged metadata they read, fused RoPE +
  cache write. With TESSERA_ATTENTION_BACKEND=triton it also runs on CPU tensors under Triton's
  interpreter (TRITON_INTERPRET=1): slow, but the exact GPU path end to end without a GPU (the tests).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from tessera.ops.attention import AttentionMetadata, PrefillChunk, paged_attention_torch, write_kv
from tessera.ops.fused_decode import DecodeStackCache
from tessera.ops.grouped_gemm import grouped_gemm_torch
from tessera.ops.rope import apply_rope

log = logging.getLogger(__name__)


@dataclass
class StepLayout:
    """The flat batch as the runner laid it out: decodes first, then prefill chunks."""

    block_tables: list[list[int]]  # per sequence, in batch order
    starts: list[int]  # per sequence: tokens already in the cache
    q_lens: list[int]  # per sequence: tokens computed this step
    num_decode: int
    block_size: int
    null_block: int  # the block padded table entries point to (it holds finite values)

    @cached_property
    def seq_lens(self) -> list[int]:
        return [s + n for s, n in zip(self.starts, self.q_lens, strict=True)]

    @cached_property
    def cu_seqlens(self) -> list[int]:
        cu = [0]
        for n in self.q_lens:
            cu.append(cu[-1] + n)
        return cu


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`. On CUDA through pinned memory and an asynchronous copy: the
    host goes on preparing the step while the copy runs (from pageable memory the copy would wait)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def _pad_tables(tables: list[list[int]], width: int, pad: int) -> list[list[int]]:
    return [t[:width] + [pad] * (width - len(t[:width])) for t in tables]


class TorchBackend:
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    # -- per step ----------------------------------------------------------------------------------
    def build_metadata(self, layout: StepLayout, slot_mapping: torch.Tensor,
                       positions: torch.Tensor) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=layout.num_decode, backend=self,
                                 positions=positions)
        cu, bs, dev = layout.cu_seqlens, layout.block_size, self.device
        nd = layout.num_decode
        for k in range(nd, len(layout.q_lens)):
            start, n = layout.starts[k], layout.q_lens[k]
            prefix = None
            if start:
                # One gather index for the whole cached prefix, built on the device from the block table.
                blocks = torch.tensor(layout.block_tables[k][: -(-start // bs)], dtype=torch.long, device=dev)
                prefix = (blocks[:, None] * bs + torch.arange(bs, device=dev)).flatten()[:start]
            meta.prefills.append(PrefillChunk(cu[k], n, start + n, prefix))
        if nd:
            self._decode_context(meta, layout, bs)
        return meta

    def _decode_context(self, meta: AttentionMetadata, layout: StepLayout, bs: int) -> None:
        """The slots of every decode's whole context, padded to the longest with the null block."""
        nd, lens = layout.num_decode, layout.seq_lens[: layout.num_decode]
        max_len = max(lens)
        bt = torch.tensor(_pad_tables(layout.block_tables[:nd], -(-max_len // bs), layout.null_block),
                          dtype=torch.long, device=self.device)
        pos = torch.arange(max_len, device=self.device)
        slots = bt[:, pos // bs] * bs + pos % bs
        valid = pos[None, :] < torch.tensor(lens, device=self.device)[:, None]
        meta.decode_slots = torch.where(valid, slots, layout.null_block * bs)
        meta.decode_mask = valid[:, None, None, :]

    def dense_view(self, meta: AttentionMetadata, num_dense: int) -> AttentionMetadata:
        """The step without its sparse decodes (rows num_dense.. of the decodes), for sparse layers."""
        return dataclasses.replace(meta, num_decode=num_dense, sparse=None, decode_slots=meta.decode_slots[:num_dense],
                                   decode_mask=meta.decode_mask[:num_dense])

    # -- layer pieces -------------------------------------------------------------------------------
    def cos_sin(self, table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        """What the layers' RoPE reads: here the batch's (cos, sin), [T, 1, D/2] each, in the model dtype."""
        return table[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)

    def rms_norm(self, norm, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual (norm(x + residual), x + residual). `norm`: an RMSNorm module."""
        return norm(x, residual)

    def head_norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of x [T, H, D] (Qwen3's q/k norms); x may be a strided view."""
        return norm(x)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def grouped_gemm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Mixture-of-experts rows x [M, K] sorted by expert, times their expert's weight w [E, N, K]:
        [M, N] (offsets [E]: cumulative row counts; tessera/ops/grouped_gemm.py)."""
        return grouped_gemm_torch(x, w, offsets)

    def rope_and_cache(self, qk: torch.Tensor, v: torch.Tensor, num_heads: int, cos_sin, kv_cache,
                       meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k ([T, Hq + Hkv, D], together: half the elementwise ops) and write k, v into the
        paged cache. Returns (q, k)."""
        qk = apply_rope(qk, *cos_sin)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        return q, k

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of every row of the step (its own K/V already in the cache): [T, Hq, D]."""
        return paged_attention_torch(q, k, v, kv_cache[0], kv_cache[1], meta, scale)

    def decode_stack(self, model, kv_caches, meta: AttentionMetadata):
        """Something whose forward(x, positions, cos_sin, slots, block_tables, seq_lens) runs all of
        `model`'s decoder layers for this step at once, or None: the layers run one by one."""
        return None


class CpuKernelBackend(TorchBackend):
    name = "cpu-kernels"

    def __init__(self, device: torch.device, kernels):
        super().__init__(device)
        self.kernels = kernels
        self._rope = hasattr(kernels, "rotary_embedding")
        self._norm = hasattr(kernels, "fused_add_rms_norm")
        self._silu = hasattr(kernels, "silu_and_mul")
        self._cache_write = hasattr(kernels, "reshape_and_cache")
        self._stacks = DecodeStackCache(kernels)

    def _decode_context(self, meta: AttentionMetadata, layout: StepLayout, bs: int) -> None:
        nd, lens = layout.num_decode, layout.seq_lens[: layout.num_decode]
        max_blocks = -(-max(lens) // bs)
        meta.decode_block_tables = torch.tensor(_pad_tables(layout.block_tables[:nd], max_blocks, layout.null_block),
                                                dtype=torch.long)
        meta.decode_seq_lens = torch.tensor(lens, dtype=torch.long)

    def decode_stack(self, model, kv_caches, meta):
        # Only plain decode steps: every row a one-token dense decode, nothing observing the layers.
        if meta.num_decode != meta.slot_mapping.shape[0] or meta.sparse is not None or meta.observe is not None:
            return None
        return self._stacks.get(model, kv_caches)

    def dense_view(self, meta: AttentionMetadata, num_dense: int) -> AttentionMetadata:
        return dataclasses.replace(meta, num_decode=num_dense, sparse=None,
                                   decode_block_tables=meta.decode_block_tables[:num_dense],
                                   decode_seq_lens=meta.decode_seq_lens[:num_dense])

    def cos_sin(self, table, positions, dtype):
        return table if self._rope else super().cos_sin(table, positions, dtype)

    def rms_norm(self, norm, x, residual=None):
        if not self._norm or x.dim() != 2 or not x.is_contiguous() or norm.per_row:
            return norm(x, residual)
        if residual is None:
            out = torch.empty_like(x)
            self.kernels.rms_norm(out, x, norm.weight, norm.eps)
            return out
        # In place: residual <- x + residual, x <- norm(residual). x is this layer's own temporary.
        self.kernels.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        return x, residual

    def head_norm(self, norm, x):
        if not self._norm or norm.per_row:
            return norm(x)
        out = x.new_empty(x.shape)  # the kernel reads x as a strided [T, H, D] slice: no copy
        self.kernels.rms_norm(out, x, norm.weight, norm.eps)
        return out

    def silu_and_mul(self, gate_up):
        if not self._silu:
            return super().silu_and_mul(gate_up)
        out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        self.kernels.silu_and_mul(out, gate_up)
        return out

    def rope_and_cache(self, qk, v, num_heads, cos_sin, kv_cache, meta):
        if not self._rope:
            return super().rope_and_cache(qk, v, num_heads, cos_sin, kv_cache, meta)
        # In place, also on a [T, H, D] view of the fused qkv output (the kernel takes any token stride).
        self.kernels.rotary_embedding(qk, meta.positions, cos_sin, qk.shape[-1])
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        if self._cache_write:
            self.kernels.reshape_and_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        else:
            write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        return q, k


class TritonBackend(TorchBackend):
    name = "triton"

    def build_metadata(self, layout, slot_mapping, positions):
        dev = self.device
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=layout.num_decode, backend=self,
                                 positions=positions)
        max_blocks = max(len(t) for t in layout.block_tables)
        meta.cu_seqlens_q = to_device(layout.cu_seqlens, torch.int32, dev)
        meta.seq_lens = to_device(layout.seq_lens, torch.int32, dev)
        tables = _pad_tables(layout.block_tables, max_blocks, layout.null_block)
        meta.block_tables = to_device(tables, torch.int32, dev)
        meta.max_seqlen_q = max(layout.q_lens)
        return meta

    def dense_view(self, meta, num_dense):
        # The sparse decodes (rows num_dense..num_decode) keep their rows, since the kernels index the
        # flat batch, but get a context of 0: the decode kernel then reads none of their K/V (an empty
        # split writes 0), and their rows are overwritten by the working-set attention anyway.
        if num_dense >= meta.num_decode:
            return meta
        seq_lens = meta.seq_lens.clone()
        seq_lens[num_dense: meta.num_decode] = 0
        return dataclasses.replace(meta, sparse=None, seq_lens=seq_lens)

    def cos_sin(self, table, positions, dtype):
        return table

    def rms_norm(self, norm, x, residual=None):
        from tessera.ops.triton import fused_add_rmsnorm, rmsnorm

        if x.dim() != 2 or x.shape[-1] != norm.weight.shape[0] or norm.per_row:
            return norm(x, residual)
        if residual is None:
            return rmsnorm(x, norm.weight, norm.eps)
        return fused_add_rmsnorm(x, residual, norm.weight, norm.eps)

    def rope_and_cache(self, qk, v, num_heads, cos_sin, kv_cache, meta):
        from tessera.ops.triton import fused_rope_and_cache_write

        # One kernel rotates q and k in place and writes k, v into the paged cache.
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        fused_rope_and_cache_write(q, k, v, meta.positions, cos_sin, kv_cache[0], kv_cache[1], meta.slot_mapping)
        return q, k

    def grouped_gemm(self, x, w, offsets):
        from tessera.ops.triton.grouped_gemm import grouped_gemm_triton

        return grouped_gemm_triton(x, w, offsets)

    def attend(self, q, k, v, kv_cache, meta, scale):
        from tessera.ops.triton import attention_cuda

        return attention_cuda(q, k, v, kv_cache[0], kv_cache[1], meta, scale, kv_written=True)


BACKENDS = ("torch", "cpu-kernels", "triton")


def choose_backend(device: torch.device) -> TorchBackend:
    """Triton on CUDA; tessera's C++ kernels on CPUs (torch ops where they cannot be built).
    TESSERA_ATTENTION_BACKEND forces one of BACKENDS."""
    forced = os.environ.get("TESSERA_ATTENTION_BACKEND")
    if forced and forced not in BACKENDS:
        raise ValueError(f"TESSERA_ATTENTION_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
    if forced == "triton" or (not forced and device.type == "cuda"):
        from tessera.ops.triton import HAS_TRITON

        if not HAS_TRITON:
            raise RuntimeError("running on a CUDA device needs Triton (pip install triton); tessera's torch "
                               "attention path is CPU-only")
        return TritonBackend(device)
    if forced == "torch" or device.type != "cpu":
        return TorchBackend(device)
    from tessera.ops.cpu_kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        if forced == "cpu-kernels":
            raise RuntimeError("TESSERA_ATTENTION_BACKEND=cpu-kernels, but tessera's C++ kernels are unavailable")
        return TorchBackend(device)
    return CpuKernelBackend(device, kernels)
