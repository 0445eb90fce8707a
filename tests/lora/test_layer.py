"""The grouped LoRA product: the CPU segment path and the Triton kernel (under the interpreter on CPU)
against a row-by-row reference; rows of the base model are left exactly as they were."""

from __future__ import annotations

import pytest
import torch

from tessera.lora.layer import add_lora_segments, lora_reference


def case(seed: int, t: int = 13, k: int = 40, slices=(24, 8, 8), rank: int = 4, num_slots: int = 3):
    g = torch.Generator().manual_seed(seed)
    bounds, at = [], 0
    for n in slices:
        bounds.append((at, at + n))
        at += n
    x = torch.randn(t, k, generator=g)
    a = torch.randn(num_slots, k, len(slices) * rank, generator=g)
    b = [torch.randn(num_slots, rank, n, generator=g) for n in slices]
    y = torch.randn(t, at, generator=g)
    # Rows: base, slot 2 x3, slot 0 x4, base x2, slot 1 x1, slot 2 x2 (contiguous runs, as the runner lays out).
    slots = torch.tensor([-1, 2, 2, 2, 0, 0, 0, 0, -1, -1, 1, 2, 2][:t], dtype=torch.int32)
    return x, a, b, bounds, y, slots, rank


def segments_of(slots):
    segs, s = [], slots.tolist()
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        if s[i] >= 0:
            segs.append((i, j, s[i]))
        i = j
    return segs


@pytest.mark.parametrize("slices", [(24, 8, 8), (40,), (16, 16)])
def test_segments_match_reference(slices):
    x, a, b, bounds, y, slots, rank = case(0, slices=slices)
    want = y + lora_reference(x, a, b, bounds, slots, rank, y.shape[1])
    got = y.clone()
    add_lora_segments(got, x, a, b, bounds, segments_of(slots), rank)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = slots < 0
    assert torch.equal(got[base], y[base])  # bit for bit: nothing was added to base rows


def test_triton_kernel_matches_reference():
    from tessera.ops.triton.lora import lora_shrink_expand

    for seed, slices, rank in [(1, (24, 8, 8), 4), (2, (40,), 8), (3, (16, 16), 2)]:
        x, a, b, bounds, y, slots, _ = case(seed, slices=slices, rank=rank)
        want = y + lora_reference(x, a, b, bounds, slots, rank, y.shape[1])
        got = y.clone()
        lora_shrink_expand(got, x, a, b, bounds, slots, rank)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[slots < 0], y[slots < 0])
