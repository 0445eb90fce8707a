"""Triton kernels: paged attention (prefill + decode), fused RoPE + KV-cache write, fused RMSNorm, and
bit-plane quantized linear layers (``bitplane_linear``, issue 15).

Importing this package never fails: when triton is missing, ``HAS_TRITON`` is False and the kernel
functions are absent (callers choose the torch backend instead). On a machine without a GPU the
kernels run under Triton's interpreter if ``TRITON_INTERPRET=1`` is set before triton is imported
(that is how the tests run them on CPU, at small sizes).

Conventions shared by the attention kernels (see each module for details):
    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot = block * block_size + off;
    cu_seqlens_q: [S+1] int32; seq_lens: [S] int32 (KV length including the new tokens);
    block_tables: [S, max_blocks] int32; bottom-right aligned causal mask; fp32 accumulation.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]

if HAS_TRITON:
    import torch

    from tessera.ops.triton.bitplane_linear import bitplane_linear
    from tessera.ops.triton.decode_attention import paged_decode_attention, reduce_decode_splits
    from tessera.ops.triton.prefill_attention import paged_prefill_attention
    from tessera.ops.triton.rmsnorm import fused_add_rmsnorm, rmsnorm
    from tessera.ops.triton.rope_cache import fused_rope_and_cache_write

    __all__ += [
        "attention_cuda",
        "bitplane_linear",
        "fused_add_rmsnorm",
        "fused_rope_and_cache_write",
        "paged_decode_attention",
        "paged_prefill_attention",
        "reduce_decode_splits",
        "rmsnorm",
    ]

    def attention_cuda(q, k, v, k_cache, v_cache, meta, scale: float, kv_written: bool = False):
        """The attention of ``tessera.ops.backend.TritonBackend``: write the new K/V into the cache,
        then run the split-K decode kernel on the leading one-token decode rows and the prefill kernel
        on the prefill chunks after them (``meta``: an ``AttentionMetadata`` with the ragged fields set).
        """
        from tessera.ops.attention import write_kv

        if meta.cu_seqlens_q is None or meta.seq_lens is None or meta.block_tables is None:
            raise ValueError("attention_cuda needs meta.cu_seqlens_q, meta.seq_lens and meta.block_tables")
        if not kv_written:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd, t = meta.num_decode, q.shape[0]
        out = torch.empty_like(q)
        if nd:
            paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.seq_lens[:nd], meta.block_tables[:nd], scale, out=out[:nd]
            )
        if nd < t:
            paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.cu_seqlens_q[nd:] - nd, meta.seq_lens[nd:],
                meta.block_tables[nd:], scale, meta.max_seqlen_q, out=out[nd:],
            )  # fmt: skip
        return out
