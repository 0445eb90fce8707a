"""The CPU attention paths (C++ decode kernel, torch fallback, prefix + chunk merge) against a float64
reference on fragmented paged caches, the decode kernel in every dtype, and its input checks."""

from __future__ import annotations

import pytest
import torch

from tessera.ops.attention import AttentionMetadata, PrefillChunk, paged_attention_torch, write_kv
from tessera.ops.cpu_kernels import cpu_kernels

BS = 16


def build_case(q_lens, seq_lens, hq, hkv, d, seed=0, dtype=torch.float32):
    """A flat batch (one-token decodes first) over a shuffled, NaN-poisoned paged cache."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // BS) for n in seq_lens) + 4
    k_cache = torch.full((nblocks, BS, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[0] = v_cache[0] = 0  # the null block padded reads land on
    free = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    tables, full_k, full_v = [], [], []
    for n in seq_lens:
        table = [free.pop() for _ in range(-(-n // BS))]
        tables.append(table)
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        write_kv(k, v, k_cache, v_cache, slots)
        full_k.append(k)
        full_v.append(v)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, full_k, full_v


def reference(q, full_k, full_v, q_lens, seq_lens, scale):
    outs, row = [], 0
    for ql, n, k, v in zip(q_lens, seq_lens, full_k, full_v, strict=True):
        qq = q[row:row + ql].double()
        rep = q.shape[1] // k.shape[1]
        kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        pos = torch.arange(n - ql, n)[:, None]
        s = s.masked_fill(torch.arange(n)[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv))
        row += ql
    return torch.cat(outs)


def block_tables(tables, pad=0):
    """[S, max_blocks] int64, short tables padded with `pad` (entries the kernel must not read)."""
    max_blocks = max(len(t) for t in tables)
    return torch.tensor([t + [pad] * (max_blocks - len(t)) for t in tables], dtype=torch.long)


def metadata(q_lens, seq_lens, tables, use_kernel: bool) -> AttentionMetadata:
    nd = sum(1 for ql in q_lens if ql == 1)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=nd)
    dec_tables, dec_lens = tables[:nd], seq_lens[:nd]
    if nd:
        bt = block_tables(dec_tables)
        if use_kernel:
            meta.decode_block_tables, meta.decode_seq_lens = bt, torch.tensor(dec_lens)
        else:
            L = max(dec_lens)
            pos = torch.arange(L)
            slots = bt[:, pos // BS] * BS + pos % BS
            valid = pos[None] < torch.tensor(dec_lens)[:, None]
            meta.decode_slots, meta.decode_mask = torch.where(valid, slots, 0), valid[:, None, None, :]
    row = nd
    for ql, n, table in zip(q_lens[nd:], seq_lens[nd:], tables[nd:], strict=True):
        start = n - ql
        prefix = torch.tensor([table[p // BS] * BS + p % BS for p in range(start)]) if start else None
        meta.prefills.append(PrefillChunk(row, ql, n, prefix))
        row += ql
    return meta


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 64), (8, 1, 40), (16, 2, 128)])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp-kernel", "torch-fallback"])
def test_mixed_batch_matches_reference(hq, hkv, d, use_kernel):
    if use_kernel and cpu_kernels() is None:
        pytest.fail("the C++ CPU kernel did not build on this machine")
    # decodes (short, long, block-aligned), then a fresh prefill, a chunk after a cached prefix.
    q_lens = [1, 1, 1, 1, 37, 20]
    seq_lens = [1, 17, 64, 333, 37, 100]
    q, kc, vc, tables, fk, fv = build_case(q_lens, seq_lens, hq, hkv, d)
    # The new tokens' K/V are the last q_len rows of each sequence's K/V.
    k_new = torch.cat([k[n - ql:] for k, n, ql in zip(fk, seq_lens, q_lens, strict=True)])
    v_new = torch.cat([v[n - ql:] for v, n, ql in zip(fv, seq_lens, q_lens, strict=True)])
    scale = d**-0.5
    meta = metadata(q_lens, seq_lens, tables, use_kernel)
    got = paged_attention_torch(q, k_new, v_new, kc, vc, meta, scale)
    want = reference(q, fk, fv, q_lens, seq_lens, scale)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() < 1e-5


# Relative tolerance of the decode kernel against a float64 reference on the same (exactly
# representable) inputs. The kernel accumulates in fp32 (errors ~1e-6 relative, counting its
# 1-ulp exp), then rounds each output once to the storage dtype: half an ulp, 2^-9 relative for
# bf16 (8 stored mantissa bits), 2^-11 for fp16. The bounds are twice that, plus an absolute
# 1e-5 for the fp32 part near zero.
RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def decode_bound(q, fk, fv, q_lens, seq_lens, scale, want):
    """The error allowed per output element. bf16 with AVX512-BF16 also rounds each probability to
    bf16 (half an ulp, 2^-9 relative) before the P.V product, as torch's CPU flash attention does:
    that moves an output by at most 2^-9 * sum_t p_t |v_t|, the reference run on |V|."""
    bound = RTOL[q.dtype] * want.abs() + 1e-5
    if q.dtype == torch.bfloat16:
        bound += 2.0**-9 * reference(q, fk, [v.abs() for v in fv], q_lens, seq_lens, scale)
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(8, 8, 64), (8, 2, 64), (16, 2, 128), (8, 1, 80), (12, 3, 128), (4, 1, 40)])
def test_decode_kernel_dtypes(kernels, dtype, hq, hkv, d):
    # seq_len 1, one token past a block, exactly one block, long, longer than a partition: with few
    # sequences the kernel splits the long ones and merges the parts.
    seq_lens = [1, 17, 16, 333, 2500, 999]
    q_lens = [1] * len(seq_lens)
    q, kc, vc, tables, fk, fv = build_case(q_lens, seq_lens, hq, hkv, d, seed=d + hq, dtype=dtype)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    # Padding entries point past the cache: the kernel must read only the blocks within seq_len.
    kernels.paged_decode_attention(out, q, kc, vc, block_tables(tables, pad=10**9), torch.tensor(seq_lens), scale)
    want = reference(q, fk, fv, q_lens, seq_lens, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - want).abs()
    bound = decode_bound(q, fk, fv, q_lens, seq_lens, scale, want)
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


def test_decode_kernel_many_sequences_and_threads(kernels):
    """A batch big enough to run unsplit on every thread, and the same batch on one thread."""
    seq_lens = [300 + 13 * i for i in range(40)]
    q_lens = [1] * len(seq_lens)
    q, kc, vc, tables, fk, fv = build_case(q_lens, seq_lens, 8, 2, 64, seed=7, dtype=torch.bfloat16)
    bt, lens = block_tables(tables), torch.tensor(seq_lens)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(out, q, kc, vc, bt, lens, 0.125)
    want = reference(q, fk, fv, q_lens, seq_lens, 0.125)
    assert ((out.double() - want).abs() <= decode_bound(q, fk, fv, q_lens, seq_lens, 0.125, want)).all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = torch.empty_like(q)
        kernels.paged_decode_attention(one, q, kc, vc, bt, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)  # no partition split either way here: the same sums in the same order


def _inputs(dtype=torch.float32, s=2, hq=4, hkv=2, d=64, nblocks=8):
    q = torch.randn(s, hq, d, dtype=dtype)
    kc = torch.randn(nblocks, BS, hkv, d, dtype=dtype)
    vc = torch.randn(nblocks, BS, hkv, d, dtype=dtype)
    bt = torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.long)[:s]
    lens = torch.tensor([40, 20], dtype=torch.long)[:s]
    return dict(out=torch.empty_like(q), q=q, k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=lens, scale=0.125)


@pytest.mark.parametrize("case,message", [
    (lambda a: a["block_tables"].__setitem__((0, 2), 8), r"block_tables\[0\]\[2\] = 8 is not a block"),
    (lambda a: a["block_tables"].__setitem__((1, 0), -1), r"block_tables\[1\]\[0\] = -1 is not a block"),
    (lambda a: a["seq_lens"].__setitem__(0, 0), r"seq_lens\[0\] = 0 is outside \[1, "),
    (lambda a: a["seq_lens"].__setitem__(1, 49), r"seq_lens\[1\] = 49 is outside \[1, max_blocks \* block_size = 48\]"),
    (lambda a: a.update(k_cache=a["k_cache"].bfloat16()), r"k_cache is BFloat16 but q is Float"),
    (lambda a: a.update(out=a["out"].half()), r"out is Half but q is Float"),
    (lambda a: a.update(q=a["q"].int(), out=a["out"].int()), r"q must be float32, bfloat16 or float16"),
    (lambda a: a.update(q=a["q"][:, :3].contiguous(), out=a["out"][:, :3].contiguous()),
     r"3 query heads are not a multiple of the 2 KV heads"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :32].contiguous(), v_cache=a["v_cache"][..., :32].contiguous()),
     r"head_dim differs: q has 64, the cache 32"),
    (lambda a: a.update(q=a["q"].transpose(0, 1).contiguous().transpose(0, 1)), r"q must be contiguous"),
    (lambda a: a.update(block_tables=a["block_tables"].int()), r"block_tables must be int64"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), r"seq_lens must be int64 \[num_seqs=2\]"),
    (lambda a: a.update(q=a["q"].to("meta")), r"q must be a CPU tensor"),
], ids=["block-id-high", "block-id-negative", "seq-len-0", "seq-len-too-long", "cache-dtype", "out-dtype",
        "int-dtype", "head-ratio", "head-dim", "non-contiguous", "int32-tables", "lens-shape", "not-cpu"])
def test_decode_kernel_checks_inputs(kernels, case, message):
    args = _inputs()
    kernels.paged_decode_attention(**args)  # the unmodified inputs are fine
    case(args)
    with pytest.raises(RuntimeError, match=message):
        kernels.paged_decode_attention(**args)


def test_decode_kernel_reads_only_blocks_within_seq_len(kernels):
    # Sequence 1 has 20 tokens: two blocks; its third table entry is garbage and must not be checked.
    args = _inputs()
    args["block_tables"][1, 2] = 12345
    kernels.paged_decode_attention(**args)
    assert torch.isfinite(args["out"]).all()
