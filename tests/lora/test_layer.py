"""The grouped LoRA product: the CPU segment path and the Triton kernel (under the interpreter on CPU)
against a row-by-row reference; rows of the base model are left exactly as they were."""

from __future__ import annotations

import pytest
import torch

from tessera.lora.layer import GEMM_FROM_ROWS, add_lora_group, add_lora_segments, lora_reference
from tessera.lora.manager import LoRAManager


def case(seed: int, t: int = 13, k: int = 40, slices=(24, 8, 8), rank: int = 4, num_slots: int = 3):
    """x, slot-stacked a [S, k, R] and block-diagonal b [S, R, out] as the manager lays them out, y,
    and each row's slot: base, slot 2 x3, slot 0 x4, base x2, slot 1 x1, slot 2 x2 (contiguous runs,
    as the runner orders them)."""
    g = torch.Generator().manual_seed(seed)
    out = sum(slices)
    x = torch.randn(t, k, generator=g)
    a = torch.randn(num_slots, k, len(slices) * rank, generator=g)
    b = torch.zeros(num_slots, len(slices) * rank, out)
    at = 0
    for j, n in enumerate(slices):
        b[:, j * rank:(j + 1) * rank, at:at + n] = torch.randn(num_slots, rank, n, generator=g)
        at += n
    y = torch.randn(t, out, generator=g)
    slots = torch.tensor([-1, 2, 2, 2, 0, 0, 0, 0, -1, -1, 1, 2, 2][:t], dtype=torch.int32)
    return x, a, b, y, slots


def runs_of(slots):
    runs, s = [], slots.tolist()
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        if s[i] >= 0:
            runs.append((i, j, s[i]))
        i = j
    return runs


@pytest.mark.parametrize("slices", [(24, 8, 8), (40,), (16, 16)])
def test_segments_match_reference(slices):
    x, a, b, y, slots = case(0, slices=slices)
    want = y + lora_reference(x, a, b, slots)
    got = y.clone()
    add_lora_segments(got, x, a, b, runs_of(slots))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[slots < 0], y[slots < 0])  # bit for bit: nothing was added to base rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slices,rank,k", [((24, 8, 8), 4, 40), ((40,), 8, 40), ((16, 16), 2, 40),
                                           ((576, 192, 192), 16, 576), ((100, 100), 16, 70)])
def test_sgmv_kernel_matches_reference(kernels, dtype, slices, rank, k):
    """The C++ kernel of every segment at once (lora_sgmv): fused and single-slice layers, ranks and
    widths that are not multiples of the vector, segments shorter and longer than its row block, one
    as long as GEMM_FROM_ROWS (ATen's GEMMs); base rows untouched, bit for bit."""
    x, a, b, y, _ = case(5, t=GEMM_FROM_ROWS + 30, k=k, slices=slices, rank=rank, num_slots=3)
    t = x.shape[0]
    slots = torch.full((t,), -1, dtype=torch.int32)
    slots[1:4] = 2  # 3 rows
    slots[4:13] = 0  # 9 rows: two full row blocks and one row
    slots[15:16] = 1
    slots[16:16 + GEMM_FROM_ROWS] = 2  # a long (prefill-like) segment
    slots[16 + GEMM_FROM_ROWS:-1] = 1
    x, a, b, y = (v.to(dtype) for v in (x, a, b, y))
    want = y.float() + lora_reference(x, a, b, slots)
    got = y.clone()
    kernels.lora_sgmv(got, x, a, b, runs_of(slots), [] if len(slices) == 1 else _bounds(slices), GEMM_FROM_ROWS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * scale)
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_sgmv_kernel_threads_agree(kernels):
    """Each row block's arithmetic is fixed, so one thread and two give the same bits."""
    x, a, b, y, slots = case(6, slices=(576, 192, 192), rank=16, k=576, num_slots=3)
    x, a, b, y = (v.to(torch.bfloat16) for v in (x, a, b, y))
    runs, bounds = runs_of(slots), _bounds((576, 192, 192))
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = y.clone()
            kernels.lora_sgmv(got, x, a, b, runs, bounds, GEMM_FROM_ROWS)
            outs.append(got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_sgmv_kernel_refuses_bad_input(kernels):
    x, a, b, y, slots = case(7)
    with pytest.raises(RuntimeError, match="bad segment"):
        kernels.lora_sgmv(y, x, a, b, [(0, 5, 3)], _bounds((24, 8, 8)), GEMM_FROM_ROWS)  # slot 3 of 3
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.lora_sgmv(y, x.bfloat16(), a, b, [(0, 5, 1)], _bounds((24, 8, 8)), GEMM_FROM_ROWS)


def test_plan_with_the_kernel_is_every_run_as_a_segment(kernels):
    mgr = LoRAManager.__new__(LoRAManager)
    mgr.max_loras, mgr.device, mgr.kernels = 4, torch.device("cpu"), kernels
    mgr.set_step([1] * 46, [0] * 40 + [1, 1, 2, 2, 3, 3], num_decode=46)
    assert mgr.step.group is None and mgr.step.segments == [(0, 40, 0), (40, 42, 1), (42, 44, 2), (44, 46, 3)]


def _bounds(slices):
    out, at = [], 0
    for n in slices:
        out.append((at, at + n))
        at += n
    return out


@pytest.mark.parametrize("num_slots", [3, 8])
def test_padded_group_matches_reference(num_slots):
    """The decode plan: base rows first, then runs of 3 adapters, as one padded batched product (all
    slots in order, or only the used ones when most would be padding)."""
    x, a, b, y, _ = case(1, num_slots=num_slots)
    slots = torch.tensor([-1, -1, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2], dtype=torch.int32)
    mgr = LoRAManager.__new__(LoRAManager)  # only the planning: no model
    mgr.max_loras, mgr.device = num_slots, torch.device("cpu")
    mgr.set_step([1] * len(slots), slots.tolist(), num_decode=len(slots))
    step = mgr.step
    assert step.group is not None and not step.segments
    assert (step.group.slots is None) == (num_slots == 3)
    got = y.clone()
    add_lora_group(got, x, a, b, step.group)
    torch.testing.assert_close(got, y + lora_reference(x, a, b, slots), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:2], y[:2])


def test_plan_a_dominant_adapter_goes_alone():
    """Skewed decodes: slot 0 has 40 rows, three others 2 each: slot 0 is a segment, the rest a group."""
    x, a, b, _, _ = case(2, t=46, num_slots=4)
    slots = [-1] * 0 + [0] * 40 + [1, 1, 2, 2, 3, 3]
    mgr = LoRAManager.__new__(LoRAManager)
    mgr.max_loras, mgr.device = 4, torch.device("cpu")
    mgr.set_step([1] * 46, slots, num_decode=46)
    assert mgr.step.segments == [(0, 40, 0)] and mgr.step.group.length == 2
    y = torch.randn(46, b.shape[-1])
    got = y.clone()
    add_lora_group(got, x, a, b, mgr.step.group)
    add_lora_segments(got, x, a, b, mgr.step.segments)
    torch.testing.assert_close(got, y + lora_reference(x, a, b, torch.tensor(slots)), rtol=1e-5, atol=1e-5)


def test_plan_segments_for_prefill_and_few_adapters():
    mgr = LoRAManager.__new__(LoRAManager)
    mgr.max_loras, mgr.device = 4, torch.device("cpu")
    # 3 decodes (base, slot 1, slot 1), then prefill chunks: 5 rows of slot 1, 4 of base, 6 of slot 3.
    mgr.set_step([1, 1, 1, 5, 4, 6], [-1, 1, 1, 1, -1, 3], num_decode=3)
    assert mgr.step.group is None and mgr.step.segments == [(1, 8, 1), (12, 18, 3)]
    mgr.set_step([1, 1], [-1, -1], num_decode=2)
    assert mgr.step is None  # nothing to add anywhere


def test_triton_kernel_matches_reference():
    from tessera.ops.triton.lora import lora_shrink_expand

    for seed, slices, rank in [(1, (24, 8, 8), 4), (2, (40,), 8), (3, (16, 16), 2)]:
        x, a, b, y, slots = case(seed, slices=slices, rank=rank)
        want = y + lora_reference(x, a, b, slots)
        got = y.clone()
        lora_shrink_expand(got, x, a, b, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[slots < 0], y[slots < 0])
