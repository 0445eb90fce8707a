"""Micro-benchmark: tessera's Triton paged attention kernels vs torch SDPA (dense, contiguous K/V).

    python -m tessera.bench.attention_kernels            # prints a JSON list, one dict per case

Each case times both systems alternately in one loop (CUDA events, median of ``reps``) after a warm-up,
so clock and thermal drift hit both alike. FLOPs count the useful work only (causal prefill: the
lower triangle, 4*D flops per (query, key, head) pair); bytes are the minimum traffic (q, K, V read
once, out written once; K/V at Hkv heads). SDPA gets K/V already expanded to Hq heads (not timed),
since not every SDPA backend takes GQA; its GB/s uses the same minimum bytes, so the two columns
compare time. Decode sizes small enough to sit in the 50 MB L2 read faster than HBM allows.
SDPA's ``is_causal`` is top-left aligned, so chunked-prefill cases (q_len < kv_len) have no SDPA
column.
"""

from __future__ import annotations

import json
import math
import statistics

import torch
import torch.nn.functional as F

__all__ = ["bench_attention"]

# (batch, q_len, ctx_len (cached prefix), hq, hkv, head_dim)
PREFILL_CASES = [
    (1, 2048, 0, 32, 8, 128),
    (4, 4096, 0, 32, 8, 128),
    (1, 16384, 0, 32, 8, 128),
    (8, 1024, 0, 9, 3, 64),  # SmolLM2-135M shape
    (1, 2048, 14336, 32, 8, 128),  # a 2K chunk on a 14K cached prefix (no SDPA equivalent)
]
# (batch, ctx_len, hq, hkv, head_dim)
DECODE_CASES = [
    (1, 16384, 32, 8, 128),
    (32, 2048, 32, 8, 128),
    (128, 4096, 32, 8, 128),
    (256, 1024, 9, 3, 64),
]


def _paged_cache(batch, kv_len, hkv, d, block_size, dtype, device, gen):
    """Random K/V in a paged cache with shuffled blocks, plus the same K/V dense [B, Hkv, L, D]."""
    nblk = math.ceil(kv_len / block_size)
    perm = torch.randperm(batch * nblk, generator=gen).to(torch.int32)
    block_tables = perm.view(batch, nblk).to(device)
    k_dense = torch.randn(batch, kv_len, hkv, d, generator=gen, dtype=torch.float32).to(device, dtype)
    v_dense = torch.randn(batch, kv_len, hkv, d, generator=gen, dtype=torch.float32).to(device, dtype)
    k_cache = torch.zeros(batch * nblk, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    pos = torch.arange(kv_len, device=device)
    for b in range(batch):
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, hkv, d)[slots] = k_dense[b]
        v_cache.view(-1, hkv, d)[slots] = v_dense[b]
    return k_cache, v_cache, block_tables, k_dense, v_dense


def _time_alternating(fns, reps, warmup):
    """Median milliseconds of each callable, timed in alternation with CUDA events."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]


def _row(kind, shape, ms, flops, nbytes):
    row = dict(kind=kind, **shape)
    for name, t in ms.items():
        row[f"{name}_ms"] = None if t is None else round(t, 4)
        row[f"{name}_tflops"] = None if t is None else round(flops / (t * 1e-3) / 1e12, 2)
        row[f"{name}_gbps"] = None if t is None else round(nbytes / (t * 1e-3) / 1e9, 1)
    if ms.get("sdpa") is not None:
        row["speedup_vs_sdpa"] = round(ms["sdpa"] / ms["tessera"], 3)
    return row


def bench_attention(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, reps: int = 30, warmup: int = 5,
    block_size: int = 16, prefill_cases=None, decode_cases=None,
) -> list[dict]:  # fmt: skip
    """Times paged_prefill_attention and paged_decode_attention against SDPA; returns one dict per case
    with ``*_ms`` (median), ``*_tflops`` and ``*_gbps`` for ``tessera`` and ``sdpa``."""
    from tessera.ops.triton import paged_decode_attention, paged_prefill_attention

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("bench_attention needs a CUDA device (CUDA-event timing)")
    dev = torch.device(device)
    torch.cuda.set_device(dev)
    gen = torch.Generator().manual_seed(0)
    el = torch.empty((), dtype=dtype).element_size()
    gpu_name = torch.cuda.get_device_name(dev)
    results = []

    for batch, q_len, ctx, hq, hkv, d in prefill_cases or PREFILL_CASES:
        kv_len = ctx + q_len
        k_cache, v_cache, bt, k_dense, v_dense = _paged_cache(batch, kv_len, hkv, d, block_size, dtype, dev, gen)
        q = torch.randn(batch * q_len, hq, d, generator=gen).to(dev, dtype)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=dev) * q_len
        seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        scale = d**-0.5

        def ours(q=q, k_cache=k_cache, v_cache=v_cache, cu=cu, seq_lens=seq_lens, bt=bt, scale=scale,
                 q_len=q_len, out=out):  # fmt: skip
            paged_prefill_attention(q, k_cache, v_cache, cu, seq_lens, bt, scale, q_len, out=out)

        fns = [ours]
        if ctx == 0:
            qd = q.view(batch, q_len, hq, d).transpose(1, 2).contiguous()
            kd = k_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2).contiguous()
            vd = v_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2).contiguous()
            fns.append(lambda qd=qd, kd=kd, vd=vd, scale=scale: F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=True, scale=scale))  # fmt: skip
        ms = _time_alternating(fns, reps, warmup)
        # (query, key) pairs under the bottom-right causal mask: each query sees ctx + i + 1 keys.
        pairs = batch * (q_len * ctx + q_len * (q_len + 1) // 2)
        flops = 4 * pairs * hq * d
        nbytes = el * batch * (2 * q_len * hq * d + 2 * kv_len * hkv * d)
        shape = dict(batch=batch, q_len=q_len, ctx_len=ctx, hq=hq, hkv=hkv, head_dim=d, dtype=str(dtype),
                     device=gpu_name)  # fmt: skip
        results.append(_row("prefill", shape, {"tessera": ms[0], "sdpa": ms[1] if len(ms) > 1 else None},
                            flops, nbytes))  # fmt: skip
        del k_cache, v_cache, k_dense, v_dense, fns
        torch.cuda.empty_cache()

    for batch, ctx, hq, hkv, d in decode_cases or DECODE_CASES:
        k_cache, v_cache, bt, k_dense, v_dense = _paged_cache(batch, ctx, hkv, d, block_size, dtype, dev, gen)
        q = torch.randn(batch, hq, d, generator=gen).to(dev, dtype)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        scale = d**-0.5
        qd = q.view(batch, hq, 1, d)
        kd = k_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2).contiguous()
        vd = v_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2).contiguous()

        def ours(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, bt=bt, scale=scale, out=out):
            paged_decode_attention(q, k_cache, v_cache, seq_lens, bt, scale, out=out)

        def sdpa(qd=qd, kd=kd, vd=vd, scale=scale):
            F.scaled_dot_product_attention(qd, kd, vd, scale=scale)

        ms = _time_alternating([ours, sdpa], reps, warmup)
        flops = 4 * batch * ctx * hq * d
        nbytes = el * batch * (2 * hq * d + 2 * ctx * hkv * d)
        shape = dict(batch=batch, q_len=1, ctx_len=ctx, hq=hq, hkv=hkv, head_dim=d, dtype=str(dtype),
                     device=gpu_name)  # fmt: skip
        results.append(_row("decode", shape, {"tessera": ms[0], "sdpa": ms[1]}, flops, nbytes))
        del k_cache, v_cache, k_dense, v_dense, kd, vd
        torch.cuda.empty_cache()
    return results


def _check_once(device: str = "cuda") -> float:
    """Largest abs difference of the two kernels vs SDPA at one small size (a sanity check before
    trusting timings)."""
    from tessera.ops.triton import paged_decode_attention, paged_prefill_attention

    gen = torch.Generator().manual_seed(1)
    batch, q_len, hq, hkv, d = 2, 300, 8, 2, 64
    k_cache, v_cache, bt, k_dense, v_dense = _paged_cache(batch, q_len, hkv, d, 16, torch.float32, device, gen)
    q = torch.randn(batch * q_len, hq, d, generator=gen).to(device)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * q_len
    seq_lens = torch.full((batch,), q_len, dtype=torch.int32, device=device)
    ours = paged_prefill_attention(q, k_cache, v_cache, cu, seq_lens, bt, d**-0.5, q_len)
    qd = q.view(batch, q_len, hq, d).transpose(1, 2)
    kd = k_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    vd = v_dense.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(1, 2).reshape_as(ours)
    err = (ours - ref).abs().max().item()
    q_dec = q.view(batch, q_len, hq, d)[:, -1]
    dec = paged_decode_attention(q_dec, k_cache, v_cache, seq_lens, bt, d**-0.5)
    return max(err, (dec - ref.view(batch, q_len, hq, d)[:, -1]).abs().max().item())


if __name__ == "__main__":
    print(json.dumps({"max_abs_err_fp32": _check_once(), "results": bench_attention()}, indent=1))
