"""Ring and TokenRing attention across gloo ranks equal dense causal attention, and send exactly the
bytes their schedules say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.distributed.launch import spawn_ranks
from tessera.distributed.ring_attention import (
    P2P,
    ring_attention,
    ring_bytes_sent,
    tokenring_attention,
    tokenring_bytes_sent,
)
from tessera.distributed.zigzag import chunk_bounds, zigzag_lengths, zigzag_positions

SCHEDULES = {"ring": ring_attention, "tokenring": tokenring_attention}


def _qkv(length: int, hq: int, hkv: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(length, hq, d, generator=g), torch.randn(length, hkv, d, generator=g),
            torch.randn(length, hkv, d, generator=g))


def _dense(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=scale)
    return out.transpose(0, 1)


def _rank(ctx, length, hq, hkv, d):
    q, k, v = _qkv(length, hq, hkv, d)
    positions = zigzag_positions(length, ctx.world_size)
    mine = positions[ctx.rank]
    out = {}
    for mode, schedule in SCHEDULES.items():
        comm = P2P(ctx.rank, ctx.world_size)
        out[mode] = schedule(q[mine], k[mine], v[mine], positions, comm, d**-0.5), comm.bytes_sent
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_tokenring_equal_dense_attention(world):
    length, hq, hkv, d = 37, 4, 2, 8  # 37: not a multiple of the ranks (nor of their 2N chunks)
    results = spawn_ranks(_rank, world, (length, hq, hkv, d), timeout_s=120)
    q, k, v = _qkv(length, hq, hkv, d)
    want = _dense(q, k, v, d**-0.5)
    lengths = zigzag_lengths(length, world)
    for mode, formula, heads in (("ring", ring_bytes_sent, hkv), ("tokenring", tokenring_bytes_sent, hq)):
        got = torch.empty_like(want)
        for r, pos in enumerate(zigzag_positions(length, world)):
            got[pos] = results[r][mode][0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, mode=mode: f"{mode}: {m}")
        for r in range(world):
            assert results[r][mode][1] == formula(lengths, r, heads, d, 4), (mode, r, results[r][mode][1])
    if world == 4:  # the formulas by hand for rank 0: chunks 5,5,5,5,5,4,4,4, so ranks hold 9, 9, 9, 10
        assert lengths == [9, 9, 9, 10]
        assert results[0]["ring"][1] == (9 + 10 + 9) * 2 * hkv * d * 4  # K/V of ranks 0, 3, 2
        # queries of ranks 0, 3, 2 forward; results for ranks 3, 2, 1 back
        assert results[0]["tokenring"][1] == (9 + 10 + 9) * hq * d * 4 + (10 + 9 + 9) * hq * (d * 4 + 4)


def test_zigzag_split_balances_causal_work():
    bounds = chunk_bounds(37, 2)
    assert [e - s for s, e in bounds] == [10, 9, 9, 9]
    pos = zigzag_positions(37, 2)
    assert pos[0].tolist() == list(range(0, 10)) + list(range(28, 37))  # rank 0 holds the last token
    assert sorted(torch.cat(pos).tolist()) == list(range(37))
    work = [int((p + 1).sum()) for p in pos]  # keys each rank's queries see under the causal mask
    assert max(work) / min(work) < 1.1
