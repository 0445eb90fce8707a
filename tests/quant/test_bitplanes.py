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


def nibble_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The tiles as the kernel reads them, spelled out from the codes: per tile of 16 rows, per pair of
    4-weight chunks, per plane, byte r = row r's 4 bits of the first chunk (low nibble), then the second's."""
    n, k = codes.shape
    t, kp = -(-n // 16), -(-k // 64) * 64
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, kp - k, 0, t * 16 - n))
    out = torch.empty(t, kp // 8, bits, 16, dtype=torch.uint8)
    for i in range(bits):
        nib = (((c >> i) & 1).view(t * 16, kp // 4, 4) * torch.tensor([1, 2, 4, 8])).sum(-1)
        byte = nib[:, 0::2] | (nib[:, 1::2] << 4)  # [N_pad, K_pad / 8]
        out[:, :, i, :] = byte.view(t, 16, kp // 8).transpose(1, 2).to(torch.uint8)
    return out


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (37, 130), (300, 577)])
def test_tiles_are_the_kernels_nibble_layout_and_blocked_tiling_is_the_same(bits, n, k, monkeypatch):
    """tile_planes only moves the canonical bytes (no unpacking): check it against the nibble layout built
    from the codes, and tile_weight's blocked tiling (small blocks forced) against tiling whole."""
    from tessera.quant import bitplanes

    g = torch.Generator().manual_seed(bits * 7 + n + k)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    planes = pack_planes(codes, bits)
    assert torch.equal(tile_planes(planes), nibble_tiles(codes, bits))
    scale, offset = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    monkeypatch.setattr(bitplanes, "TILE_BLOCK_WEIGHTS", 1)  # one tile (16 rows) per block
    tiles, s, o = bitplanes.tile_weight(planes, scale, offset)
    assert torch.equal(tiles, tile_planes(planes))
    assert torch.equal(s, bitplanes.tile_group_params(scale)) and torch.equal(o, bitplanes.tile_group_params(offset))


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
