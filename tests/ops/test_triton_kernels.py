"""Triton kernels (paged prefill / decode attention, split reduction, RoPE + cache write, RMSNorm) and
merge_attention_states against float64 torch references.

Without a CUDA device the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
the kernels are imported) at small sizes. ``pytest -m gpu tests/ops`` runs the large bf16 cases.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (a dev dependency: the suite fails loudly without it)

if not torch.cuda.is_available() and type(triton.language.zeros).__name__ != "InterpretedFunction":
    # triton was imported (e.g. by transformers) before TRITON_INTERPRET was set: its own jit functions
    # are compiled-mode and cannot run in the interpreter. tests/conftest.py must set the variable.
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py "
        "(or run `pytest tests/ops`)"
    )

from tessera.ops.merge import merge_attention_states  # noqa: E402
from tessera.ops.triton import HAS_TRITON  # noqa: E402

assert HAS_TRITON
from tessera.ops.triton import (  # noqa: E402
    fused_add_rmsnorm,
    fused_rope_and_cache_write,
    paged_decode_attention,
    paged_prefill_attention,
    reduce_decode_splits,
    rmsnorm,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu


# ----------------------------------------------------------------------------------------------------
# Inputs and float64 references
# ----------------------------------------------------------------------------------------------------


def make_paged_kv(seq_lens, hkv, d, block_size, dtype, device, gen, extra_blocks=3):
    """Random K/V for each sequence in a NaN-poisoned paged cache with shuffled block ids.

    Block 0 is never allocated (the block-table padding points at it) and every unused slot is NaN, so a
    kernel that reads a slot past seq_len or a padded table entry produces NaN.
    Returns (k_cache, v_cache, block_tables int32, per-sequence contiguous (K, V) in float64).
    """
    nblk = [math.ceil(n / block_size) for n in seq_lens]
    total = sum(nblk) + extra_blocks + 1
    ids = (torch.randperm(total - 1, generator=gen) + 1).tolist()
    width = max(nblk + [1]) + 2
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    k_cache = torch.full((total, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    kv = []
    for s, n in enumerate(seq_lens):
        mine = [ids.pop() for _ in range(nblk[s])]
        block_tables[s, : nblk[s]] = torch.tensor(mine, dtype=torch.int32)
        kk = torch.randn(n, hkv, d, generator=gen).to(dtype)
        vv = torch.randn(n, hkv, d, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, hkv, d)[slots] = kk
        v_cache.view(-1, hkv, d)[slots] = vv
        kv.append((kk.double(), vv.double()))
    return k_cache.to(device), v_cache.to(device), block_tables.to(device), kv


def ref_attention(q, kv, q_lens, scale):
    """float64 bottom-right-causal attention per sequence. Returns (out [T, Hq, D], lse [T, Hq])."""
    qd = q.double()
    outs, lses = [], []
    start = 0
    for (kk, vv), ql in zip(kv, q_lens, strict=True):
        qs = qd[start : start + ql]
        start += ql
        n, hkv, d = kk.shape
        qpk = qs.shape[1] // hkv
        kk, vv = kk.to(qs.device), vv.to(qs.device)
        k_rep = kk.repeat_interleave(qpk, dim=1)
        v_rep = vv.repeat_interleave(qpk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, k_rep) * scale
        qpos = n - ql + torch.arange(ql, device=qs.device)
        masked = torch.arange(n, device=qs.device)[None, :] > qpos[:, None]
        scores = scores.masked_fill(masked[None], float("-inf"))
        lse = torch.logsumexp(scores, -1)  # [h, q]
        p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, v_rep).nan_to_num(0.0))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def assert_close(actual, expected, rtol, atol, what=""):
    actual = actual.double().to(expected.device)
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (unwritten element or bad read)"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_prefill_case(q_lens, ctx_lens, hq, hkv, d, block_size, dtype=torch.float32, device=DEV, seed=0,
                     block_m=None, block_n=None, rtol=1e-4, atol=1e-4):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + ql for c, ql in zip(ctx_lens, q_lens, strict=True)]
    k_cache, v_cache, block_tables, kv = make_paged_kv(seq_lens, hkv, d, block_size, dtype, device, gen)
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    res = paged_prefill_attention(q, k_cache, v_cache, cu, sl, block_tables, scale, max(q_lens), out=out,
                                  block_m=block_m, block_n=block_n)  # fmt: skip
    assert res is out
    ref, _ = ref_attention(q, kv, q_lens, scale)
    assert_close(out, ref, rtol, atol, "prefill")


def run_decode_case(seq_lens, hq, hkv, d, block_size, num_splits, dtype=torch.float32, device=DEV, seed=0,
                    block_n=None, rtol=1e-4, atol=1e-4):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables, kv = make_paged_kv(seq_lens, hkv, d, block_size, dtype, device, gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype).to(device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    res, lse = paged_decode_attention(q, k_cache, v_cache, sl, block_tables, scale, num_splits, out=out,
                                      return_lse=True, block_n=block_n)  # fmt: skip
    assert res is out
    # Sequences without keys are left out of the reference; the kernel must give them 0 and lse -inf.
    nz = torch.tensor([n > 0 for n in seq_lens], device=q.device)
    ref_nz, lse_nz = ref_attention(q[nz], [kv_s for kv_s, n in zip(kv, seq_lens, strict=True) if n],
                                   [1] * int(nz.sum()), scale)  # fmt: skip
    ref = torch.zeros(len(seq_lens), hq, d, dtype=torch.float64, device=q.device)
    ref_lse = torch.full((len(seq_lens), hq), float("-inf"), dtype=torch.float64, device=q.device)
    ref[nz], ref_lse[nz] = ref_nz, lse_nz
    assert_close(out, ref, rtol, atol, "decode out")
    torch.testing.assert_close(lse.double().to(ref_lse.device), ref_lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# merge_attention_states
# ----------------------------------------------------------------------------------------------------


def _partial(scores, v):
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("thk,khd->thd", torch.exp(scores - lse[..., None]), v), lse


def test_merge_attention_states_matches_full_softmax():
    gen = torch.Generator().manual_seed(1)
    t, h, d, na, nb = 5, 3, 8, 7, 4
    scores = torch.randn(t, h, na + nb, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(na + nb, h, d, generator=gen, dtype=torch.float64)
    full_out, full_lse = _partial(scores, v)
    oa, la = _partial(scores[..., :na], v[:na])
    ob, lb = _partial(scores[..., na:], v[na:])
    out, lse = merge_attention_states(oa.float(), la.float(), ob.float(), lb.float())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), full_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), full_lse, rtol=1e-6, atol=1e-6)
    out64, lse64 = merge_attention_states(oa, la, ob, lb)
    torch.testing.assert_close(out64, full_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse64, full_lse, rtol=1e-12, atol=1e-12)


def test_merge_attention_states_empty_parts():
    gen = torch.Generator().manual_seed(2)
    t, h, d = 4, 2, 8
    oa = torch.randn(t, h, d, generator=gen)
    la = torch.randn(t, h, generator=gen)
    garbage = torch.full((t, h, d), float("nan"))
    ninf = torch.full((t, h), float("-inf"))
    out, lse = merge_attention_states(oa, la, garbage, ninf)  # empty b: a unchanged
    torch.testing.assert_close(out, oa)
    torch.testing.assert_close(lse, la)
    out, lse = merge_attention_states(garbage, ninf, oa, la)  # empty a
    torch.testing.assert_close(out, oa)
    out, lse = merge_attention_states(garbage, ninf, garbage.clone(), ninf.clone())  # both empty
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = merge_attention_states(oa.bfloat16(), la, oa.bfloat16(), la)  # equal halves
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(lse, la + math.log(2.0))


# ----------------------------------------------------------------------------------------------------
# Prefill (mixed batches: decode rows, fresh prefills, prefix-cached chunks, an empty sequence)
# ----------------------------------------------------------------------------------------------------

MIXED_Q = [1, 23, 17, 1, 0, 40]
MIXED_CTX = [37, 0, 45, 0, 9, 13]


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "mqa8"])
def test_prefill_mixed_batch_small_tiles(hq, hkv):
    # 16-key steps over 8-slot blocks, 16/32-row tiles: many tiles, diagonal crossings, tails.
    block_m = 32 if hq // hkv == 8 else 16
    run_prefill_case(MIXED_Q, MIXED_CTX, hq, hkv, d=32, block_size=8, block_m=block_m, block_n=16)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)], ids=["gqa1", "gqa3"])
def test_prefill_default_tiles(hq, hkv):
    # Default tile choice; block_size 16 < BLOCK_N 64 (several blocks per key tile).
    run_prefill_case([29, 1, 70], [0, 80, 35], hq, hkv, d=64, block_size=16, seed=3)


def test_prefill_odd_head_dim_and_big_blocks():
    # head_dim 40 (padded to 64 in registers); cache blocks of 32 > BLOCK_N 16.
    run_prefill_case([19, 33], [50, 0], 6, 2, d=40, block_size=32, block_m=16, block_n=16, seed=4)


@pytest.mark.parametrize("seed", range(6))
def test_prefill_random_batches(seed):
    """Random mixed batches: random lengths (about a third decode rows), cache block sizes, GQA ratios
    and tile shapes (BLOCK_Q = BLOCK_M // QPK is 5 or 10 tokens for GQA 3)."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    n = int(torch.randint(1, 7, (1,), generator=g))
    q_lens = [1 if torch.rand(1, generator=g) < 0.35 else int(torch.randint(0, 60, (1,), generator=g))
              for _ in range(n)]  # fmt: skip
    ctx_lens = [int(torch.randint(0, 90, (1,), generator=g)) for _ in range(n)]
    if sum(q_lens) == 0:
        q_lens[0] = 1
    ctx_lens = [c if ql else max(c, 1) for c, ql in zip(ctx_lens, q_lens, strict=True)]
    hq, hkv = pick([(3, 3), (6, 2), (8, 1), (16, 2)])
    block_m = max(pick([16, 32, 64]), triton_next_pow2(hq // hkv))
    run_prefill_case(q_lens, ctx_lens, hq, hkv, d=pick([16, 32, 48]), block_size=pick([4, 8, 16, 32]),
                     seed=seed, block_m=block_m, block_n=pick([16, 32]))  # fmt: skip


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_prefill_only_decode_rows_matches_decode_kernel():
    gen = torch.Generator().manual_seed(5)
    seq_lens = [1, 30, 77, 64]
    hq, hkv, d, bs = 8, 2, 32, 16
    k_cache, v_cache, bt, _ = make_paged_kv(seq_lens, hkv, d, bs, torch.float32, DEV, gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(DEV)
    cu = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    a = paged_prefill_attention(q, k_cache, v_cache, cu, sl, bt, 0.2, 1)
    b = paged_decode_attention(q, k_cache, v_cache, sl, bt, 0.2, num_splits=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_cuda_glue_mixed_batch():
    """attention_cuda (the engine's GPU entry): writes the new K/V at slot_mapping, then decode rows
    (first) through the split-K kernel and prefill chunks through the prefill kernel."""
    from tessera.ops.attention import AttentionMetadata
    from tessera.ops.triton import attention_cuda

    gen = torch.Generator().manual_seed(11)
    q_lens, ctx = [1, 1, 1, 20, 9], [40, 0, 70, 0, 33]
    seq_lens = [c + n for c, n in zip(ctx, q_lens, strict=True)]
    hq, hkv, d, bs = 6, 2, 32, 8
    k_cache, v_cache, bt, kv = make_paged_kv(seq_lens, hkv, d, bs, torch.float32, DEV, gen)
    new_k = torch.cat([kk[c:] for (kk, _), c in zip(kv, ctx, strict=True)]).float().to(DEV)
    new_v = torch.cat([vv[c:] for (_, vv), c in zip(kv, ctx, strict=True)]).float().to(DEV)
    slots = torch.cat(
        [
            bt[s, p // bs].long() * bs + p % bs
            for s, p in enumerate(torch.arange(c, c + n, device=DEV) for c, n in zip(ctx, q_lens, strict=True))
        ]
    )
    k_cache.view(-1, hkv, d)[slots] = float("nan")  # the kernel must write them first
    v_cache.view(-1, hkv, d)[slots] = float("nan")
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(DEV)
    meta = AttentionMetadata(slot_mapping=slots.to(DEV), num_decode=3, decode_slots=None, decode_mask=None)
    meta.cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(DEV)
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    meta.block_tables = bt
    meta.max_seqlen_q = max(q_lens)
    out = attention_cuda(q, new_k, new_v, k_cache, v_cache, meta, d**-0.5)
    ref, _ = ref_attention(q, kv, q_lens, d**-0.5)
    assert_close(out, ref, 1e-4, 1e-4, "attention_cuda")


def test_sparse_decode_rows_skip_dense_attention():
    """TritonBackend.dense_view (what a sparse layer runs dense): the sparse decodes' rows read none of
    their paged K/V (poisoned with NaN here), the other rows are unchanged."""
    from tessera.ops.backend import StepLayout, TritonBackend
    from tessera.ops.triton import attention_cuda

    gen = torch.Generator().manual_seed(5)
    q_lens, ctx = [1, 1, 1, 12], [30, 45, 20, 9]
    seq_lens = [c + n for c, n in zip(ctx, q_lens, strict=True)]
    hq, hkv, d, bs = 4, 2, 32, 8
    k_cache, v_cache, bt, kv = make_paged_kv(seq_lens, hkv, d, bs, torch.float32, DEV, gen)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(DEV)
    tables = [[b for b in row if b] for row in bt.tolist()]
    layout = StepLayout(tables, starts=ctx, q_lens=q_lens, num_decode=3, block_size=bs, null_block=0)
    backend = TritonBackend(torch.device(DEV))
    meta = backend.build_metadata(layout, torch.zeros(sum(q_lens), dtype=torch.long, device=DEV),
                                  torch.zeros(sum(q_lens), dtype=torch.long, device=DEV))
    ref, _ = ref_attention(q, kv, q_lens, d**-0.5)
    for s in (1, 2):  # the sparse decodes' blocks: reading any of them gives NaN
        for b in tables[s]:
            k_cache[b] = float("nan")
            v_cache[b] = float("nan")
    dense = backend.dense_view(meta, 1)
    assert dense.seq_lens.tolist() == [31, 0, 0, 21] and meta.seq_lens.tolist() == seq_lens
    out = attention_cuda(q, None, None, k_cache, v_cache, dense, d**-0.5, kv_written=True)
    assert torch.isfinite(out).all()
    assert (out[1:3] == 0).all()
    keep = [0, *range(3, sum(q_lens))]
    assert_close(out[keep], ref[keep], 1e-4, 1e-4, "dense rows")
    assert backend.dense_view(meta, 3) is meta  # no sparse rows: nothing to change


def test_package_imports_without_triton():
    import subprocess
    import sys

    code = "import sys; sys.modules['triton'] = None; import tessera.ops.triton as t; assert not t.HAS_TRITON"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------
# Decode (split-K) and the split reduction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "mqa8"])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode(hq, hkv, num_splits):
    run_decode_case([1, 37, 100, 16, 53], hq, hkv, d=32, block_size=8, num_splits=num_splits, block_n=16)


def test_decode_many_splits_empty_splits_and_empty_sequence():
    # 8 splits of a 20-key context leave most splits empty; a seq_len 0 row gives 0 and lse -inf.
    run_decode_case([20, 0, 3, 130], 6, 2, d=40, block_size=16, num_splits=8, block_n=16, seed=7)


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_batches(seed):
    g = torch.Generator().manual_seed(200 + seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    seq_lens = torch.randint(1, 200, (n,), generator=g).tolist()
    hq, hkv = [(4, 4), (9, 3), (8, 1), (16, 2)][seed]
    num_splits = [None, 2, 5, 16][int(torch.randint(4, (1,), generator=g))]
    run_decode_case(seq_lens, hq, hkv, d=32, block_size=[4, 8, 16, 32][seed], num_splits=num_splits,
                    block_n=[16, 32][seed % 2], seed=seed)  # fmt: skip


def test_reduce_splits_agrees_with_merge_attention_states():
    gen = torch.Generator().manual_seed(8)
    s, h, ns, d = 3, 4, 5, 24
    part_out = torch.randn(s, h, ns, d, generator=gen)
    part_lse = torch.randn(s, h, ns, generator=gen) * 4
    empty = torch.rand(s, h, ns, generator=gen) < 0.3
    empty[0, 0] = True  # one (seq, head) with every split empty
    part_lse[empty] = float("-inf")
    part_out[empty] = float("nan")  # an empty split's output must be ignored
    exp_out, exp_lse = functools.reduce(
        lambda acc, i: merge_attention_states(acc[0], acc[1], part_out[:, :, i], part_lse[:, :, i]),
        range(1, ns),
        (part_out[:, :, 0], part_lse[:, :, 0]),
    )
    out = torch.full((s, h, d), float("nan"), device=DEV)
    out_k, lse_k = reduce_decode_splits(part_out.to(DEV), part_lse.to(DEV), out=out)
    assert out_k is out
    assert not torch.isnan(out_k).any()
    torch.testing.assert_close(out_k.cpu(), exp_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_k.cpu(), exp_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(out_k[0, 0].cpu(), torch.zeros(d)) and torch.isneginf(lse_k[0, 0]).item()


# ----------------------------------------------------------------------------------------------------
# RoPE + cache write, RMSNorm
# ----------------------------------------------------------------------------------------------------


def make_cos_sin(max_pos, d, base=10000.0):
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1)  # [max_pos, D]: cos | sin


def ref_rope(x, positions, cos_sin):
    """HF Llama apply_rotary_pos_emb (rotate_half) in float64."""
    d = x.shape[-1]
    cos = cos_sin[positions, : d // 2].repeat(1, 2)[:, None, :]
    sin = cos_sin[positions, d // 2 :].repeat(1, 2)[:, None, :]
    x = x.double()
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def run_rope_case(t, hq, hkv, d, block_size, dtype, device, rtol, atol, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_pos = 300
    cos_sin64 = make_cos_sin(max_pos, d)
    # q, k, v as strided views of one fused QKV projection output, as the model produces them.
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(device)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(device)
    num_blocks = math.ceil(t / block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::4] = -1  # padding tokens: rotate, but do not write the cache
    slot_mapping = slots.to(device)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))

    fused_rope_and_cache_write(q, k, v, positions, cos_sin64.float().to(device), k_cache, v_cache, slot_mapping)

    pos = positions.cpu()
    assert_close(q, ref_rope(q0.cpu(), pos, cos_sin64).to(q.device), rtol, atol, "rope q")
    assert_close(k, ref_rope(k0.cpu(), pos, cos_sin64).to(k.device), rtol, atol, "rope k")
    assert torch.equal(v, v0)
    valid = slot_mapping >= 0
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slot_mapping[valid]], k[valid])  # exactly the rotated k
    assert torch.equal(flat_v[slot_mapping[valid]], v0[valid])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slot_mapping[valid]] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 32), (3, 1, 40)])
def test_rope_and_cache_write(hq, hkv, d):
    run_rope_case(t=13, hq=hq, hkv=hkv, d=d, block_size=4, dtype=torch.float32, device=DEV,
                  rtol=1e-5, atol=1e-5)  # fmt: skip


def ref_rmsnorm(h, weight, eps):
    h = h.double()
    return weight.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def hf_rmsnorm(h, weight, eps):
    """HF LlamaRMSNorm.forward, verbatim semantics (for the dtype-rounding comparison)."""
    hs = h.to(torch.float32)
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hs.to(h.dtype)


@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 64)])
def test_rmsnorm_and_fused_add(shape):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=gen).to(DEV)
    r = torch.randn(*shape, generator=gen).to(DEV)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEV)
    eps = 1e-6
    x0, r0 = x.clone(), r.clone()
    y = rmsnorm(x, w, eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref_rmsnorm(x, w, eps), 1e-5, 1e-5, "rmsnorm")
    normed, new_res = fused_add_rmsnorm(x, r, w, eps)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched
    assert_close(new_res, x.double() + r.double(), 1e-6, 1e-6, "residual")
    assert_close(normed, ref_rmsnorm(x.double() + r.double(), w, eps), 1e-5, 1e-5, "fused rmsnorm")


# ----------------------------------------------------------------------------------------------------
# GPU: real tile sizes, bf16, contexts up to 16K  (pytest -m gpu tests/ops)
# ----------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64), (16, 1, 128)])
def test_gpu_prefill_bf16_long(hq, hkv, d):
    # a 2K-token chunk on a 14K cached prefix (16K context), a fresh 3000-token prefill, decode rows
    run_prefill_case([2048, 3000, 1, 1, 517], [14336, 0, 16383, 5000, 1000], hq, hkv, d, block_size=16,
                     dtype=torch.bfloat16, device="cuda", rtol=2e-2, atol=2e-2)  # fmt: skip


@gpu
def test_gpu_prefill_fp32_default_tiles():
    run_prefill_case([1000, 1, 333], [0, 4000, 2000], 12, 4, 64, block_size=16, device="cuda")


@gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64), (16, 1, 128)])
@pytest.mark.parametrize("num_splits", [1, None])
def test_gpu_decode_bf16_16k(hq, hkv, d, num_splits):
    lens = [16384, 1, 7000, 12345, 300, 16000, 2, 9999]
    run_decode_case(lens, hq, hkv, d, block_size=16, num_splits=num_splits, dtype=torch.bfloat16,
                    device="cuda", rtol=2e-2, atol=2e-2)  # fmt: skip


@gpu
def test_gpu_decode_fp32_many_seqs():
    lens = [(i * 977) % 4096 + 1 for i in range(64)]
    run_decode_case(lens, 8, 2, 128, block_size=32, num_splits=None, device="cuda")


@gpu
def test_gpu_rope_bf16():
    run_rope_case(t=1000, hq=32, hkv=8, d=128, block_size=16, dtype=torch.bfloat16, device="cuda",
                  rtol=1e-2, atol=1e-2)  # fmt: skip


@gpu
def test_gpu_rmsnorm_bf16_matches_hf():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(300, 4096, generator=gen).bfloat16().cuda()
    r = torch.randn(300, 4096, generator=gen).bfloat16().cuda()
    w = (1 + 0.1 * torch.randn(4096, generator=gen)).bfloat16().cuda()
    normed, new_res = fused_add_rmsnorm(x, r, w, 1e-5)
    assert torch.equal(new_res, x + r)
    expected = hf_rmsnorm(x + r, w, 1e-5)
    torch.testing.assert_close(normed, expected, rtol=1.6e-2, atol=1e-2)  # at most 1 bf16 ulp
    assert (normed == expected).float().mean() > 0.99
