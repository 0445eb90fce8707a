"""Bit-plane storage of N-bit weights (bipolar-INT).

An N-bit code q in [0, 2^N) is stored as its N bits b_0..b_{N-1}, one *plane* per bit: plane i holds
bit i of every weight of the matrix, packed 8 to a byte along the input dimension K. Read as bipolar
digits (a bit stands for -1 or +1), the same planes spell the odd integer

    v = sum_i 2^i (2 b_i - 1) = 2 q - (2^N - 1),

so one layout serves unsigned codes, bipolar values and ordinary signed integers t = (v - 1) / 2 (in
[-2^(N-1), 2^(N-1))), all losslessly. A product with activations x is a sum of shifted one-bit-plane
products, sum_k x_k q_k = sum_i 2^i (sum of x_k over the k whose bit i is set), so one kernel family
serves every width and fewer bits mean fewer bytes read.

Layout: planes are uint8 [bits, N, K_pad / 8] with K padded to a multiple of 64 (a kernel reads a
64-weight word per plane; padded weights have code 0 and meet zero-padded activations). Bit k % 8 of
byte k // 8 is weight k (little-endian), the order numpy's packbits(bitorder="little") uses.
"""

from __future__ import annotations

import torch

WORD = 64  # weights per kernel word; K is padded to a multiple of it


def padded_k(k: int) -> int:
    return (k + WORD - 1) // WORD * WORD


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^bits) -> uint8 planes [bits, N, K_pad / 8]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, k = codes.shape
    c = codes.to(torch.int32)
    if int(c.min()) < 0 or int(c.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    kp = padded_k(k)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    weights = (1 << torch.arange(8, dtype=torch.int32))  # bit j of a byte is weight 8m + j
    planes = torch.empty(bits, n, kp // 8, dtype=torch.uint8)
    for i in range(bits):
        b = ((c >> i) & 1).view(n, kp // 8, 8)
        planes[i] = (b * weights).sum(-1).to(torch.uint8)
    return planes


def unpack_planes(planes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 planes [bits, N, K_pad / 8] -> int32 codes [N, k]."""
    bits, n, kb = planes.shape
    shifts = torch.arange(8, dtype=torch.int32)
    codes = torch.zeros(n, kb * 8, dtype=torch.int32)
    for i in range(bits):
        b = (planes[i].to(torch.int32)[..., None] >> shifts) & 1
        codes |= b.view(n, kb * 8) << i
    return codes[:, :k]


def codes_to_bipolar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """q -> v = 2q - (2^N - 1): the odd integers in [-(2^N - 1), 2^N - 1]."""
    return 2 * codes.to(torch.int64) - ((1 << bits) - 1)


def bipolar_to_codes(v: torch.Tensor, bits: int) -> torch.Tensor:
    return (v.to(torch.int64) + ((1 << bits) - 1)) // 2


def signed_to_bipolar(t: torch.Tensor) -> torch.Tensor:
    """An N-bit two's-complement value t in [-2^(N-1), 2^(N-1)) -> the bipolar v = 2t + 1."""
    return 2 * t.to(torch.int64) + 1


def bipolar_to_signed(v: torch.Tensor) -> torch.Tensor:
    return (v.to(torch.int64) - 1).div(2, rounding_mode="floor")


def bitplane_int_matmul(x: torch.Tensor, planes: torch.Tensor, k: int) -> torch.Tensor:
    """Integer x [M, k] times the bipolar matrix V [N, k] of `planes`, transposed: x @ V^T computed as
    the paper does it, sum_i 2^i (2 (x @ B_i^T) - rowsum(x)), with one {0, 1} plane B_i at a time.
    int64 throughout, so it equals the plain integer product exactly (the test checks it)."""
    bits, n, kb = planes.shape
    x = x.to(torch.int64)
    rowsum = x.sum(-1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64)
    out = torch.zeros(x.shape[0], n, dtype=torch.int64)
    for i in range(bits):
        plane = ((planes[i].to(torch.int64)[..., None] >> shifts) & 1).view(n, kb * 8)[:, :k]
        out += (1 << i) * (2 * (x @ plane.T) - rowsum)
    return out


TILE_ROWS = 16  # output rows per kernel tile (one vector of fp32 lanes on AVX-512)


def tile_planes(planes: torch.Tensor) -> torch.Tensor:
    """Canonical planes [bits, N, K_pad / 8] -> the kernel's tiles [N_pad / 16, K_pad / 8, bits, 16]:
    per tile of 16 rows, per pair of 4-weight chunks (8 weights), per plane, byte r = the 4 bits of row
    r at the pair's first chunk (low nibble) and second chunk (high nibble). Padded rows are zero.
    That byte is the canonical byte itself (bit j = weight 8m + j in both), so tiling only moves bytes:
    no codes are unpacked and packed again."""
    bits, n, kb = planes.shape
    t = -(-n // TILE_ROWS)
    padded = torch.nn.functional.pad(planes, (0, 0, 0, t * TILE_ROWS - n)) if t * TILE_ROWS != n else planes
    return padded.reshape(bits, t, TILE_ROWS, kb).permute(1, 3, 0, 2).contiguous()


# Tiling copies what it tiles (padded, then permuted): a large weight is tiled this many weights at a time
# (a multiple of TILE_ROWS rows) straight into its output, so the transients stay small whatever its size.
TILE_BLOCK_WEIGHTS = 1 << 20


def tile_weight_into(planes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, tiles_out: torch.Tensor,
                     scale_out: torch.Tensor, offset_out: torch.Tensor) -> None:
    """tile_planes / tile_group_params of a canonical weight (planes [bits, n, K_pad / 8], scale and offset
    [n, groups]) written into the given outputs, a block of rows at a time: the same bytes as tiling it
    whole (a tile is 16 independent rows; only the last block has padded rows, zero in both)."""
    bits, n, kb = planes.shape
    rows = max(TILE_ROWS, TILE_BLOCK_WEIGHTS // max(kb * 8, 1) // TILE_ROWS * TILE_ROWS)
    for r in range(0, n, rows):
        t, e = r // TILE_ROWS, min(n, r + rows)
        block = tile_planes(planes[:, r:e])
        tiles_out[t:t + block.shape[0]].copy_(block)
        scale_out[t:t + block.shape[0]].copy_(tile_group_params(scale[r:e]))
        offset_out[t:t + block.shape[0]].copy_(tile_group_params(offset[r:e]))


def tile_weight(planes: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_planes(planes), tile_group_params(scale), tile_group_params(offset)), made a block at a time."""
    bits, n, kb = planes.shape
    t = -(-n // TILE_ROWS)
    out = (torch.empty(t, kb, bits, TILE_ROWS, dtype=torch.uint8),
           torch.empty(t, scale.shape[1], TILE_ROWS, dtype=scale.dtype),
           torch.empty(t, offset.shape[1], TILE_ROWS, dtype=offset.dtype))
    tile_weight_into(planes, scale, offset, *out)
    return out


def untile_planes(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of tile_planes: [N_pad / 16, K_pad / 8, bits, 16] -> canonical [bits, n, K_pad / 8]."""
    t, kb, bits, _ = tiles.shape
    return tiles.permute(2, 0, 3, 1).reshape(bits, t * TILE_ROWS, kb)[:, :n].contiguous()


def tile_group_params(p: torch.Tensor) -> torch.Tensor:
    """Per-group scale or offset [N, groups] -> [N_pad / 16, groups, 16] (rows in the lanes; pads 0)."""
    n, g = p.shape
    t = -(-n // TILE_ROWS)
    p = torch.nn.functional.pad(p, (0, 0, 0, t * TILE_ROWS - n))
    return p.view(t, TILE_ROWS, g).transpose(1, 2).contiguous()


def untile_group_params(p: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of tile_group_params: [N_pad / 16, groups, 16] -> [n, groups]."""
    t, g, _ = p.shape
    return p.transpose(1, 2).reshape(t * TILE_ROWS, g)[:n].contiguous()
