"""The per-CPU choice between the bit-plane kernels' tables and bf16 dot products (tessera.quant.kernel_choice)."""

import json

import pytest

from tessera.quant import kernel_choice
from tessera.quant.kernel_choice import (
    CHOICE_FILE,
    ENV,
    NEVER_GEMM,
    KernelChoice,
    measure,
    measure_gemm_rows,
    tune_bitplane_kernels,
)


def fake_timer(dp_wins: set[int]):
    """A timer under which the dot products take 1 us at the widths in dp_wins and 3 us elsewhere, the
    tables 2 us everywhere."""
    def timer(kernels, bits, dp_min_bits, rounds):
        if dp_min_bits == 9:
            return [2e-6] * rounds
        return [1e-6 if bits in dp_wins else 3e-6] * rounds
    return timer


@pytest.mark.parametrize("dp_wins, want", [({1, 2, 3, 4}, 1), ({3, 4}, 3), ({4}, 4), ({1, 2, 4}, 4),
                                           ({1, 2, 3}, 5), (set(), 5)])
def test_measure_keeps_the_widest_run_of_wins_from_four_down(dp_wins, want):
    choice, medians = measure(None, fake_timer(dp_wins))
    assert choice == want
    assert medians[4]["tables_us"] == 2.0 and medians[4]["dp_us"] == (1.0 if 4 in dp_wins else 3.0)


class FakeKernels:
    def __init__(self, path):
        self.__file__ = str(path / "module.so")
        self.bitplane_dp = True
        self.threshold = 3
        self.brgemm = False

    def _bitplane_gemm_uses_brgemm(self):
        return self.brgemm

    def _set_bitplane_dp_min_bits(self, bits):
        before, self.threshold = self.threshold, bits
        return before


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    tune_bitplane_kernels.cache_clear()
    yield
    tune_bitplane_kernels.cache_clear()


def test_choice_is_measured_once_stored_and_read_back(tmp_path, monkeypatch, fresh):
    calls = []

    def fake_measure(kernels):
        calls.append(kernels)
        return 2, {"note": "fake"}

    def fake_rows(kernels):
        assert kernels.threshold == 2  # timed with the chosen threshold set
        return 128, {}

    monkeypatch.setattr(kernel_choice, "measure", fake_measure)
    monkeypatch.setattr(kernel_choice, "measure_gemm_rows", fake_rows)
    k = FakeKernels(tmp_path)
    assert tune_bitplane_kernels(k) == KernelChoice(2, 128) and k.threshold == 2 and len(calls) == 1
    stored = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert stored["dp_min_bits"] == 2 and stored["bf16_gemm_from_rows"] == 128
    tune_bitplane_kernels.cache_clear()  # a new process: the stored choice, no new measurement
    k2 = FakeKernels(tmp_path)
    assert tune_bitplane_kernels(k2) == KernelChoice(2, 128) and k2.threshold == 2 and len(calls) == 1
    (tmp_path / CHOICE_FILE).write_text("not json")  # a damaged file is measured again
    tune_bitplane_kernels.cache_clear()
    k3 = FakeKernels(tmp_path)
    k3.brgemm = True  # AMX brgemm: its own threshold, the batched crossover is not timed
    assert tune_bitplane_kernels(k3) == KernelChoice(2, None) and len(calls) == 2


def test_environment_overrides_and_is_checked(tmp_path, monkeypatch, fresh):
    monkeypatch.setattr(kernel_choice, "measure", lambda kernels: pytest.fail("measured despite the override"))
    monkeypatch.setenv(ENV, "9")
    k = FakeKernels(tmp_path)
    assert tune_bitplane_kernels(k) == KernelChoice(9) and k.threshold == 9
    tune_bitplane_kernels.cache_clear()
    monkeypatch.setenv(ENV, "0")
    with pytest.raises(ValueError, match=ENV):
        tune_bitplane_kernels(FakeKernels(tmp_path))


def test_no_dot_product_build_means_tables(tmp_path, fresh):
    k = FakeKernels(tmp_path)
    k.bitplane_dp = False
    assert tune_bitplane_kernels(k) == KernelChoice(9) and k.threshold == 3  # nothing set, nothing stored
    assert not (tmp_path / CHOICE_FILE).exists()


@pytest.mark.parametrize("gemm_wins_from, want", [(96, 96), (16, 16), (10_000, NEVER_GEMM)])
def test_measure_gemm_rows_stops_at_the_first_win(gemm_wins_from, want):
    seen = []

    def timer(kernels, rows, batched, rounds):
        seen.append(rows)
        return [1e-6 if batched == (rows >= gemm_wins_from) else 2e-6] * rounds

    rows, medians = measure_gemm_rows(None, timer)
    assert rows == want and max(seen) == min(want, 512) and set(medians) == set(r for r in seen)


def test_gemm_rows_follow_the_choice(tmp_path, monkeypatch):
    """bf16 x without AMX brgemm takes the timed crossover at the dot-product widths, nothing else does."""
    import torch

    from tessera.ops.linear import DENSE, Linear
    from tessera.quant import bits_linear
    from tessera.quant.quantize import QuantSpec

    method = bits_linear.BitsLinearMethod(QuantSpec(4), DENSE)
    layer = Linear(128, 32)
    layer.qtiles = (torch.empty(2, 16, 4, 16, dtype=torch.uint8),)  # 4 planes, K 128
    k = FakeKernels(tmp_path)
    monkeypatch.setattr(bits_linear, "tune_bitplane_kernels", lambda kernels: KernelChoice(1, 96))
    assert method.gemm_rows(layer, torch.bfloat16, k) == 96
    assert method.gemm_rows(layer, torch.float32, k) == method.gemm_from_rows
    k.brgemm = True
    assert method.gemm_rows(layer, torch.bfloat16, k) == method.brgemm_from_rows
    k.brgemm = False
    monkeypatch.setattr(bits_linear, "tune_bitplane_kernels", lambda kernels: KernelChoice(5, 96))  # tables at 4
    assert method.gemm_rows(layer, torch.bfloat16, k) == method.gemm_from_rows
    monkeypatch.setattr(bits_linear, "tune_bitplane_kernels", lambda kernels: KernelChoice(1, None))
    assert method.gemm_rows(layer, torch.bfloat16, k) == method.gemm_from_rows


def test_real_kernels_time_both_paths(kernels):
    """On the built module: both kernels run at every width and the threshold is put back after timing."""
    before = kernels._set_bitplane_dp_min_bits(3)
    try:
        for bits in (1, 4):
            for threshold in (1, 9):
                times = kernel_choice.time_gemv(kernels, bits, threshold, rounds=2)
                assert len(times) == 2 and all(t > 0 for t in times)
                assert kernels._set_bitplane_dp_min_bits(3) == 3
        for batched in (False, True):
            assert len(kernel_choice.time_rows(kernels, 16, batched, rounds=2)) == 2
    finally:
        kernels._set_bitplane_dp_min_bits(before)
