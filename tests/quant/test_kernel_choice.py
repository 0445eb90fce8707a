"""The per-CPU choice between the bit-plane kernels' tables and bf16 dot products (tessera.quant.kernel_choice)."""

import json

import pytest

from tessera.quant import kernel_choice
from tessera.quant.kernel_choice import CHOICE_FILE, ENV, measure, tune_dp_min_bits


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

    def _set_bitplane_dp_min_bits(self, bits):
        before, self.threshold = self.threshold, bits
        return before


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    tune_dp_min_bits.cache_clear()
    yield
    tune_dp_min_bits.cache_clear()


def test_choice_is_measured_once_stored_and_read_back(tmp_path, monkeypatch, fresh):
    calls = []

    def fake_measure(kernels):
        calls.append(kernels)
        return 2, {"note": "fake"}

    monkeypatch.setattr(kernel_choice, "measure", fake_measure)
    k = FakeKernels(tmp_path)
    assert tune_dp_min_bits(k) == 2 and k.threshold == 2 and len(calls) == 1
    assert json.loads((tmp_path / CHOICE_FILE).read_text())["dp_min_bits"] == 2
    tune_dp_min_bits.cache_clear()  # a new process: the stored choice, no new measurement
    k2 = FakeKernels(tmp_path)
    assert tune_dp_min_bits(k2) == 2 and k2.threshold == 2 and len(calls) == 1
    (tmp_path / CHOICE_FILE).write_text("not json")  # a damaged file is measured again
    tune_dp_min_bits.cache_clear()
    assert tune_dp_min_bits(FakeKernels(tmp_path)) == 2 and len(calls) == 2


def test_environment_overrides_and_is_checked(tmp_path, monkeypatch, fresh):
    monkeypatch.setattr(kernel_choice, "measure", lambda kernels: pytest.fail("measured despite the override"))
    monkeypatch.setenv(ENV, "9")
    k = FakeKernels(tmp_path)
    assert tune_dp_min_bits(k) == 9 and k.threshold == 9
    tune_dp_min_bits.cache_clear()
    monkeypatch.setenv(ENV, "0")
    with pytest.raises(ValueError, match=ENV):
        tune_dp_min_bits(FakeKernels(tmp_path))


def test_no_dot_product_build_means_tables(tmp_path, fresh):
    k = FakeKernels(tmp_path)
    k.bitplane_dp = False
    assert tune_dp_min_bits(k) == 9 and k.threshold == 3  # nothing set, nothing stored
    assert not (tmp_path / CHOICE_FILE).exists()


def test_real_kernels_time_both_paths(kernels):
    """On the built module: both kernels run at every width and the threshold is put back after timing."""
    before = kernels._set_bitplane_dp_min_bits(3)
    try:
        for bits in (1, 4):
            for threshold in (1, 9):
                times = kernel_choice.time_gemv(kernels, bits, threshold, rounds=2)
                assert len(times) == 2 and all(t > 0 for t in times)
                assert kernels._set_bitplane_dp_min_bits(3) == 3
    finally:
        kernels._set_bitplane_dp_min_bits(before)
