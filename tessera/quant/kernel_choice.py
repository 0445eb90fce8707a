"""Which of the two bit-plane kernels multiplies bf16 activations at each width, chosen on this CPU.

`bitplane_linear` has two ways to the same product for bf16 x at 1-4 planes: the lookup tables
(ops/csrc/bitplane_linear.cpp: per plane a byte widening and two permutes) and the codes rebuilt in
registers and multiplied by bf16 dot products (ops/csrc/bitplane_dp.h: the same work at every width).
Which is cheaper at few planes depends on the CPU, and not on any flag it reports: on the 2-core Xeon
(AMX, Sapphire Rapids class) the tables won at 1-2 planes (1.18-1.7x, docs/benchmarks.md, 2026-12-01);
on the 2-core AMD EPYC (AVX512-BF16, no AMX) 2-bit decode through the tables ran at 0.83x 4-bit decode
through the dot products (2026-12-02). So the kernel measures both, once per build of the kernels (a
build is already specific to the CPU's features), at a GEMV of fixed shape, and keeps the widest
width from which the dot products won at every width up to 4 (`dp_min_bits`; 5: tables everywhere).
Where `bitplane_gemm` has no AMX brgemm (it then dequantizes blocks and calls at::linear), it also times
that against `bitplane_linear` at 4 bits for growing batches and keeps the row count from which the
batched kernel won (on the AMD EPYC: the dot-product kernel 1.4-2.3x faster from 16 to 128 rows).

The result is stored beside the build and read back by every later process, so one machine always
takes the same kernel and results repeat from run to run (the two kernels agree within fp32
summation error, not bit for bit). TESSERA_BITPLANE_DP_MIN_BITS=N overrides it (1..9; 9: tables only).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHOICE_FILE = "bitplane_dp_min_bits.json"
ENV = "TESSERA_BITPLANE_DP_MIN_BITS"
SHAPE = (2048, 1024)  # N x K of the GEMV timed: 1 MiB of planes at 4 bits, K a whole number of groups
ROUNDS = 25
LADDER = (16, 32, 64, 96, 128, 192, 256, 384, 512)  # rows of x at which the batched kernel is tried
NEVER_GEMM = 1024  # the tables/dot products up to BitsLinearMethod.dense_from_rows
TABLES_ONLY = 9  # a dp_min_bits no width reaches: the lookup tables at every width


@lru_cache(maxsize=1)  # measure() times one width at a time
def _gemv_inputs(bits: int):
    """A random bits-wide weight of SHAPE in the kernel's tiles, one bf16 row of x and its output."""
    from tessera.quant.bitplanes import tile_weight
    from tessera.quant.quantize import QuantSpec, quantize_weight

    n, k = SHAPE
    g = torch.Generator().manual_seed(bits)
    qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits))
    return tile_weight(qw.planes, qw.scale, qw.offset), torch.randn(1, k, generator=g).bfloat16(), \
        torch.empty(1, n, dtype=torch.bfloat16)


def _call_times(call, rounds: int) -> list[float]:
    """Seconds of each of `rounds` calls of call(), after one warm-up call."""
    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times[1:]


def time_rows(kernels, rows: int, batched: bool, rounds: int) -> list[float]:
    """Seconds per call of `rows` bf16 rows times the 4-bit weight of SHAPE through `bitplane_gemm`
    (batched) or `bitplane_linear`, `rounds` calls after one warm-up call."""
    (tiles, scale, offset), _, _ = _gemv_inputs(4)
    n, k = SHAPE
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    if batched:
        return _call_times(lambda: kernels.bitplane_gemm(out, x, tiles, scale, offset, n, None, 1 << 20), rounds)
    return _call_times(lambda: kernels.bitplane_linear(out, x, tiles, scale, offset, n, None), rounds)


def measure_gemm_rows(kernels, timer=time_rows) -> tuple[int, dict]:
    """(the fewest rows of LADDER from which `bitplane_gemm` beat `bitplane_linear` at 4 bits, else
    NEVER_GEMM; the medians in microseconds per row count), the two alternating."""
    medians = {}
    for rows in LADDER:
        linear, gemm = [], []
        for _ in range(3):
            linear += timer(kernels, rows, False, 2)
            gemm += timer(kernels, rows, True, 2)
        medians[rows] = {"linear_us": round(statistics.median(linear) * 1e6, 1),
                         "gemm_us": round(statistics.median(gemm) * 1e6, 1)}
        if medians[rows]["gemm_us"] < medians[rows]["linear_us"]:
            return rows, medians
    return NEVER_GEMM, medians


def time_gemv(kernels, bits: int, dp_min_bits: int, rounds: int = ROUNDS) -> list[float]:
    """Seconds per call of one bf16 row times a random bits-wide weight of SHAPE, with the given
    threshold set, `rounds` calls after one warm-up call."""
    (tiles, scale, offset), x, out = _gemv_inputs(bits)
    n = SHAPE[0]
    before = kernels._set_bitplane_dp_min_bits(dp_min_bits)
    try:
        return _call_times(lambda: kernels.bitplane_linear(out, x, tiles, scale, offset, n, None), rounds)
    finally:
        kernels._set_bitplane_dp_min_bits(before)


def measure(kernels, timer=time_gemv) -> tuple[int, dict]:
    """(dp_min_bits, the medians in microseconds per width) from timing both kernels at 1-4 planes,
    tables and dot products alternating a few calls at a time."""
    medians = {}
    for bits in (1, 2, 3, 4):
        tables, dots = [], []
        for _ in range(3):
            tables += timer(kernels, bits, TABLES_ONLY, ROUNDS // 3)
            dots += timer(kernels, bits, 1, ROUNDS // 3)
        medians[bits] = {"tables_us": round(statistics.median(tables) * 1e6, 2),
                         "dp_us": round(statistics.median(dots) * 1e6, 2)}
    choice = 5
    for bits in (4, 3, 2, 1):  # the widest run of widths, from 4 down, at which the dot products won
        if medians[bits]["dp_us"] >= medians[bits]["tables_us"]:
            break
        choice = bits
    return choice, medians


@dataclass(frozen=True)
class KernelChoice:
    dp_min_bits: int  # bf16 x takes the dot products from this many planes up (TABLES_ONLY: never)
    # Where bitplane_gemm has no AMX brgemm: bf16 x at 1-4 planes takes it from this many rows (None: the
    # class default, BitsLinearMethod.gemm_from_rows). On the AMD EPYC the dot-product kernel beat the
    # blockwise dequantize + at::linear path up to 128-192 rows.
    bf16_gemm_from_rows: int | None = None


@cache
def tune_bitplane_kernels(kernels) -> KernelChoice:
    """Set the module's threshold for this machine (stored result, else measured and stored) and
    return the choice. Tables everywhere (dp_min_bits 9) where the dot-product kernel is not built."""
    if not getattr(kernels, "bitplane_dp", False):
        return KernelChoice(TABLES_ONLY)
    forced = os.environ.get(ENV)
    if forced:  # a fixed threshold, and the class default for the batched kernel: nothing timed
        if not forced.isdigit() or not 1 <= int(forced) <= TABLES_ONLY:
            raise ValueError(f"{ENV} must be a width from 1 to 9 (9: the tables only), not {forced!r}")
        kernels._set_bitplane_dp_min_bits(int(forced))
        return KernelChoice(int(forced))
    path = Path(kernels.__file__).parent / CHOICE_FILE
    try:
        stored = json.loads(path.read_text())
        choice = KernelChoice(int(stored["dp_min_bits"]), stored["bf16_gemm_from_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        log.info("timing the bit-plane kernels once for this CPU (tables vs bf16 dot products, and the batched kernel)")
        dp_min_bits, medians = measure(kernels)
        rows, row_medians = None, {}
        if dp_min_bits <= 4 and not kernels._bitplane_gemm_uses_brgemm():
            before = kernels._set_bitplane_dp_min_bits(dp_min_bits)
            try:
                rows, row_medians = measure_gemm_rows(kernels)
            finally:
                kernels._set_bitplane_dp_min_bits(before)
        choice = KernelChoice(dp_min_bits, rows)
        try:  # written whole, then renamed: another process never reads half a file
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"dp_min_bits": dp_min_bits, "bf16_gemm_from_rows": rows, "shape": SHAPE,
                                       "medians": medians, "rows_medians": row_medians}, indent=1))
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache: measured again next time
            log.warning("could not store the bit-plane kernel choice in %s: %s", path, e)
        log.info("bit-plane kernels: bf16 dot products from %d planes up (medians per width: %s); batched "
                 "kernel from %s rows (%s)", dp_min_bits, medians, rows, row_medians)
    kernels._set_bitplane_dp_min_bits(choice.dp_min_bits)
    return choice
