"""Grouped GEMM over rows sorted by expert: torch's grouped mm (the CPU path) and the Triton kernel (in
Triton's interpreter without a GPU) against one F.linear per expert."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tessera.ops.grouped_gemm import grouped_gemm_reference, grouped_gemm_torch  # noqa: E402
from tessera.ops.triton.grouped_gemm import grouped_gemm_triton, tile_schedule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per-expert row counts: empty experts first, last and between, one expert with everything, a count
# that crosses the 16-row tile, single rows.
COUNTS = [[3, 0, 17, 1], [0, 0, 0, 5], [40, 0, 0, 0], [1, 1, 1, 1], [0, 33, 0, 16]]


def _case(counts, n=72, k=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    w = torch.randn(len(counts), n, k, generator=g).to(dtype)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    # The definition, written out: each expert's rows times its own weight.
    expected = torch.cat([x[s:s + c].double() @ w[e].double().T
                          for e, (s, c) in enumerate(zip(offsets.tolist(), counts, strict=True))
                          for s in [s - c]])
    return x, w, offsets, expected


@pytest.mark.parametrize("counts", COUNTS)
def test_torch_grouped_gemm_equals_per_expert_linear(counts):
    x, w, offsets, expected = _case(counts)
    torch.testing.assert_close(grouped_gemm_torch(x, w, offsets).double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grouped_gemm_reference(x, w, offsets).double(), expected, rtol=1e-5, atol=1e-4)


def test_tile_schedule_covers_each_experts_rows_once():
    offsets = torch.tensor([3, 3, 20, 21, 53], dtype=torch.int32)
    expert, row = tile_schedule(offsets, 53, 16)
    assert len(expert) == -(-53 // 16) + 5
    tiles = [(e, r) for e, r in zip(expert.tolist(), row.tolist(), strict=True) if e >= 0]
    assert tiles == [(0, 0), (2, 3), (2, 19), (3, 20), (4, 21), (4, 37)]


@pytest.mark.parametrize("counts", COUNTS)
def test_triton_grouped_gemm_equals_per_expert_linear(counts):
    x, w, offsets, expected = _case(counts)
    out = grouped_gemm_triton(x.to(DEVICE), w.to(DEVICE), offsets.to(DEVICE))
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_grouped_gemm_half_precision(dtype):
    x, w, offsets, expected = _case([5, 0, 19, 8], n=64, k=64, dtype=dtype, seed=1)
    out = grouped_gemm_triton(x.to(DEVICE), w.to(DEVICE), offsets.to(DEVICE))
    assert out.dtype == dtype
    # fp32 accumulation, one rounding of the output: within the dtype's half-ulp of the exact product.
    eps = torch.finfo(dtype).eps
    assert ((out.cpu().double() - expected).abs() <= eps * expected.abs() + 1e-3).all()


def test_triton_grouped_gemm_rejects_mismatched_shapes():
    x, w, offsets, _ = _case([2, 2])
    with pytest.raises(ValueError, match="grouped_gemm"):
        grouped_gemm_triton(x[:, :-1], w, offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_grouped_gemm_model_sized_on_gpu(dtype):
    """Qwen3-30B-A3B's expert shapes (128 experts, H 2048, F 768), 4096 tokens x top-8, skewed routing."""
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, f, pairs = 128, 2048, 768, 4096 * 8
    probs = torch.rand(e, device="cuda", generator=g) ** 4
    ids = torch.multinomial(probs, pairs, replacement=True, generator=g)
    offsets = torch.cumsum(torch.bincount(ids, minlength=e), 0).to(torch.int32)
    x = torch.randn(pairs, h, device="cuda", generator=g, dtype=dtype)
    w = torch.randn(e, 2 * f, h, device="cuda", generator=g, dtype=dtype) / h**0.5
    out = grouped_gemm_triton(x, w, offsets)
    ref = grouped_gemm_reference(x.float(), w.float(), offsets)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
