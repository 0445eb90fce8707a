"""Quantizers: round-to-nearest keeps every weight within half a step, HQQ lowers its own objective,
and specs are checked."""

import pytest
import torch

from tessera.errors import InvalidRequestError
from tessera.quant.quantize import QuantSpec, quantize_weight


def test_spec_parse_and_errors():
    assert QuantSpec.parse("bits:4") == QuantSpec(4, 64, "rtn")
    assert QuantSpec.parse("bits:2", 128, "hqq") == QuantSpec(2, 128, "hqq")
    for bad in ("bits:0", "bits:9", "int4", "bits:", "", "bits:x"):
        with pytest.raises(InvalidRequestError, match="bits:N"):
            QuantSpec.parse(bad)
    with pytest.raises(InvalidRequestError, match="group size"):
        QuantSpec.parse("bits:4", group_size=48)
    with pytest.raises(InvalidRequestError, match="group size"):
        QuantSpec.parse("bits:4", group_size=8)
    with pytest.raises(InvalidRequestError, match="method"):
        QuantSpec.parse("bits:4", method="gptq")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [16, 64, 128])
def test_rtn_within_half_a_step(bits, group):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(bits + group))
    qw = quantize_weight(w, QuantSpec(bits, group))
    codes = qw.codes()
    assert codes.shape == w.shape and int(codes.min()) >= 0 and int(codes.max()) < 1 << bits
    step = qw.scale.repeat_interleave(group, dim=1)[:, : w.shape[1]]
    err = (qw.dequantize() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    # Each group's extremes are represented exactly (m = min, d * (2^N - 1) + m = max), up to rounding.
    assert float(err.max()) > 0 or bits == 8


def test_rtn_in_row_blocks_equals_the_whole_matrix(monkeypatch):
    """A large weight is quantized a block of rows at a time into one result: the same bytes as whole."""
    from tessera.quant import quantize

    w = torch.randn(53, 200, generator=torch.Generator().manual_seed(3))
    whole = quantize_weight(w, QuantSpec(3, 32))
    monkeypatch.setattr(quantize, "RTN_BLOCK_WEIGHTS", 7 * 200)  # blocks of 7 rows, the last one short
    blocked = quantize_weight(w, QuantSpec(3, 32))
    for part in ("planes", "scale", "offset"):
        assert torch.equal(getattr(blocked, part), getattr(whole, part)), part


def test_bf16_weights_quantize_like_their_fp32_values():
    w = torch.randn(8, 64).bfloat16()
    a, b = quantize_weight(w, QuantSpec(4)), quantize_weight(w.float(), QuantSpec(4))
    assert torch.equal(a.planes, b.planes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_lowers_its_lp_objective_against_rtn(bits):
    import hqq  # noqa: F401  (the reference solver; a dependency of tessera's quantization)

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    w[:, ::17] *= 6  # outliers, where HQQ's l_p (p < 1) objective differs most from RTN's range
    rtn = quantize_weight(w, QuantSpec(bits, 64, "rtn")).dequantize()
    hq = quantize_weight(w, QuantSpec(bits, 64, "hqq")).dequantize()

    def lp(e, p=0.7):  # HQQ's objective: sum |W - dequant(W)|^p
        return float((e.abs() ** p).sum())

    assert lp(w - hq) < lp(w - rtn)
