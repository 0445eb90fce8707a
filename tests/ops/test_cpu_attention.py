"""The CPU attention paths (C++ decode kernel, torch fallback, prefix + chunk merge) against a float64
reference on fragmented paged caches."""

from __future__ import annotations

import pytest
import torch

from tessera.ops.attention import AttentionMetadata, PrefillChunk, paged_attention_torch, write_kv
from tessera.ops.cpu_kernels import cpu_kernels

BS = 16


def build_case(q_lens, seq_lens, hq, hkv, d, seed=0):
    """A flat batch (one-token decodes first) over a shuffled, NaN-poisoned paged cache."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // BS) for n in seq_lens) + 4
    k_cache = torch.full((nblocks, BS, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[0] = v_cache[0] = 0  # the null block padded reads land on
    free = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    tables, full_k, full_v = [], [], []
    for n in seq_lens:
        table = [free.pop() for _ in range(-(-n // BS))]
        tables.append(table)
        k = torch.randn(n, hkv, d, generator=g)
        v = torch.randn(n, hkv, d, generator=g)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        write_kv(k, v, k_cache, v_cache, slots)
        full_k.append(k)
        full_v.append(v)
    q = torch.randn(sum(q_lens), hq, d, generator=g)
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


def metadata(q_lens, seq_lens, tables, use_kernel: bool) -> AttentionMetadata:
    nd = sum(1 for ql in q_lens if ql == 1)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=nd)
    dec_tables, dec_lens = tables[:nd], seq_lens[:nd]
    if nd:
        max_blocks = max(len(t) for t in dec_tables)
        bt = torch.tensor([t + [0] * (max_blocks - len(t)) for t in dec_tables])
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
