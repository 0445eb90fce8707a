"""Bit-plane storage: every conversion is lossless, and the plane-by-plane integer product is the
integer product, bit for bit, for every width."""

import pytest
import torch

from tessera.quant.bitplanes import (
    bipolar_to_codes,
    bipolar_to_signed,
    bitplane_int_matmul,
    codes_to_bipolar,
    pack_planes,
    signed_to_bipolar,
    tile_planes,
    unpack_planes,
)

WIDTHS = range(1, 9)


@pytest.mark.parametrize("bits", WIDTHS)
def test_signed_bipolar_and_codes_round_trip_exhaustively(bits):
    signed = torch.arange(-(1 << (bits - 1)), 1 << (bits - 1))
    v = signed_to_bipolar(signed)
    assert torch.equal(v % 2, torch.ones_like(v))  # bipolar values are the odd integers
    assert int(v.abs().max()) == (1 << bits) - 1
    assert torch.equal(bipolar_to_signed(v), signed)
    codes = torch.arange(1 << bits)
    assert torch.equal(bipolar_to_codes(codes_to_bipolar(codes, bits), bits), codes)
    # The planes spell v: sum_i 2^i (2 b_i - 1).
    b = (codes[:, None] >> torch.arange(bits)) & 1
    assert torch.equal(((2 * b - 1) << torch.arange(bits)).sum(-1), codes_to_bipolar(codes, bits))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 63), (5, 64), (9, 130), (3, 577)])
def test_pack_unpack_and_tiles_round_trip(bits, n, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    planes = pack_planes(codes, bits)
    assert planes.shape == (bits, n, -(-k // 64) * 8)
    assert torch.equal(unpack_planes(planes, k), codes.to(torch.int32))
    from tessera.quant.bitplanes import untile_planes

    assert torch.equal(untile_planes(tile_planes(planes), n), planes)
    from tessera.quant.bitplanes import tile_group_params, untile_group_params

    params = torch.randn(n, 3)
    assert torch.equal(untile_group_params(tile_group_params(params), n), params)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_planes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="bits must be"):
        pack_planes(torch.tensor([[0]]), 9)


@pytest.mark.parametrize("bits", WIDTHS)
def test_bitplane_integer_matmul_equals_integer_matmul(bits):
    g = torch.Generator().manual_seed(bits)
    for m, n, k in [(3, 5, 37), (2, 17, 100), (4, 8, 129)]:
        codes = torch.randint(0, 1 << bits, (n, k), generator=g)
        x = torch.randint(-1000, 1000, (m, k), generator=g)
        want = x @ codes_to_bipolar(codes, bits).T
        assert torch.equal(bitplane_int_matmul(x, pack_planes(codes, bits), k), want)
