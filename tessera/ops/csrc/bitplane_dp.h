// The bit-plane product for bf16 activations on CPUs with AVX512-BF16, GFNI and AVX512-VBMI (Sapphire
// Rapids and later; Zen 4): the planes' bits are turned back into codes in registers, and the codes,
// exact small integers in bf16, are multiplied by the activations with bf16 dot products (vdpbf16ps,
// 32 exact products summed in fp32 per instruction). Included by bitplane_linear.cpp, which chooses
// it (tile_product_dp) for bf16 x and widths up to kDpMaxBits.
//
// Why: the lookup-table kernel spends, per 8 weights, 16 rows and plane, a byte widening and two
// permutes, all on one vector port, so a 4-bit weight costs 4 lookups' worth of that port. Here the
// cost per 8 weights and 16 rows is the same for every width up to 4:
//   1. one vpermb gathers, for rows 2q and 2q+1, the width's plane bytes into qword q (byte-reversed,
//      as the next step wants): 8 bytes = 8 bit-vectors over the 8 weights;
//   2. one gf2p8affineqb transposes each qword's 8x8 bit matrix: byte j of qword q becomes
//      code(row 2q, weight j) | code(row 2q + 1, weight j) << 4;
//   3. four vpermw (a 32-entry table of the bf16 values 0..15, indexed by bits 0-4 of each 16-bit
//      word; bit 4 is the neighbour's and the table repeats so it does not matter), after shifts by
//      0, 4, 8, 12, give the codes of rows 2q / 2q + 1 at weights 2t / 2t + 1 as bf16 words;
//   4. four vdpbf16ps against the activations broadcast in the matching order (x_dp, built once per
//      call): each lane sums two of a row's products, two lanes per row, rows 2q in one accumulator
//      and rows 2q + 1 in the other; the pairs of lanes are added once per tile.
// Products of bf16 codes and bf16 activations are exact in fp32, and the sums are fp32 (the
// instruction flushes denormal inputs to zero: below 1e-38, nothing a logit can see), so the result
// equals dequantize-then-matmul within fp32 summation error, like the lookup-table kernel's.
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__GFNI__) && defined(__AVX512BW__)
#define TCPU_BITPLANE_DP 1
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "prefetch.h"

namespace tcpu {
namespace dp {

constexpr int kDpMaxBits = 4;  // codes must fit a nibble (two rows share a byte after the transpose)

// x_dp for one row of x: per pair of 4-weight chunks p (8 weights) and h in {0, 1}, the qword of bf16
// [x(8p + h), x(8p + 2 + h), x(8p + 4 + h), x(8p + 6 + h)], zero past K. Word t of it meets word t of a
// code qword, which holds weight 2t (h = 0) or 2t + 1 (h = 1).
inline void pack_x(uint64_t* dst, const uint16_t* xbits, int64_t K, int64_t KP) {
  for (int64_t p = 0; p < KP / 8; ++p)
    for (int h = 0; h < 2; ++h) {
      uint64_t q = 0;
      for (int t = 0; t < 4; ++t) {
        const int64_t k = 8 * p + 2 * t + h;
        q |= static_cast<uint64_t>(k < K ? xbits[k] : 0) << (16 * t);
      }
      dst[2 * p + h] = q;
    }
}

struct Consts {
  __m512i gather, eye, table;
  __mmask64 keep;
  __m512i even_rows, odd_rows, pick1, pick2;
};

inline Consts consts(int bits) {
  Consts c;
  alignas(64) uint8_t g[64];
  uint64_t keep = 0;
  // Byte 7 - i of qword q is data byte i: plane i of row 2q (i < 4) or plane i - 4 of row 2q + 1; the
  // tile holds plane i's 16 row bytes at i * 16. Bytes of planes the width lacks are zeroed.
  for (int q = 0; q < 8; ++q)
    for (int i = 0; i < 8; ++i) {
      const int plane = i % 4, row = 2 * q + (i >= 4);
      g[8 * q + 7 - i] = static_cast<uint8_t>(plane * 16 + row);
      if (plane < bits) keep |= uint64_t{1} << (8 * q + 7 - i);
    }
  c.gather = _mm512_load_si512(g);
  c.keep = keep;
  c.eye = _mm512_set1_epi64(0x8040201008040201LL);  // byte j = 1 << j: gf2p8affine then transposes
  alignas(64) uint16_t t[32];
  for (int e = 0; e < 32; ++e) {
    const float f = static_cast<float>(e & 15);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[e] = static_cast<uint16_t>(u >> 16);  // small integers are exact in bf16
  }
  c.table = _mm512_load_si512(t);
  alignas(64) int32_t ev[16], od[16], p1[16], p2[16];
  for (int l = 0; l < 16; ++l) {
    ev[l] = 2 * (l / 2);  // lane l of the even-row accumulator belongs to row 2 (l / 2)
    od[l] = 2 * (l / 2) + 1;
    // Row r from its two lanes: even r from the even accumulator's lanes r, r + 1; odd r from the odd
    // one's lanes r - 1, r (indices >= 16 pick the second source).
    p1[l] = (l % 2 == 0) ? l : 16 + l - 1;
    p2[l] = (l % 2 == 0) ? l + 1 : 16 + l;
  }
  c.even_rows = _mm512_load_si512(ev);
  c.odd_rows = _mm512_load_si512(od);
  c.pick1 = _mm512_load_si512(p1);
  c.pick2 = _mm512_load_si512(p2);
  return c;
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// The codes of one pair of chunks (8 weights) of a tile's 16 rows, as gf2p8affine leaves them: byte j of
// qword q = code(row 2q, weight j) | code(row 2q + 1, weight j) << 4.
inline __m512i pair_codes(const Consts& c, const uint8_t* pair, int bits) {
  const __mmask64 load_mask = bits >= 4 ? ~uint64_t{0} : (uint64_t{1} << (16 * bits)) - 1;
  const __m512i raw = _mm512_maskz_loadu_epi8(load_mask, pair);
  return _mm512_gf2p8affine_epi64_epi8(c.eye, _mm512_maskz_permutexvar_epi8(c.keep, c.gather, raw), 0);
}

// The codes of weight j of the pair as 16 fp32 lanes, lane r = row r: vpmultishiftqb moves, in qword q,
// bits 8j.. (row 2q's nibble) to dword 2q and bits 8j + 4.. (row 2q + 1's) to dword 2q + 1, and vpermps
// reads bits 0-3 of each dword as an index into the floats 0..15.
inline __m512 weight_codes(__m512i codes, int j) {
  const long long ctrl = static_cast<long long>((8 * j) | (uint64_t(8 * j + 4) << 32));
  const __m512i idx = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(ctrl), codes);
  return _mm512_permutexvar_ps(idx, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// out[m0 .. m0 + MM, tile t's 16 rows] for one tile; tp is the tile's bytes, xq the x_dp of all rows
// (KP / 8 * 2 qwords a row), gsum the sums of x per group.
template <int MM>
inline void tile(float (*res)[16], const Consts& c, const uint8_t* tp, const float* scale, const float* offset,
                 const uint64_t* xq, const float* gsum, int64_t m0, int64_t t, int64_t KP, int bits,
                 int64_t group) {
  const int64_t P = KP / 8, G = KP / group, ppg = group / 8;
  __m512 ye[MM], yo[MM], yoff[MM];
  for (int m = 0; m < MM; ++m) ye[m] = yo[m] = yoff[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // At one or two rows of x, separate chains for the two weights of a lane (2t and 2t + 1), so that a
    // row's dot products do not wait on each other (the instruction's latency bound them before).
    constexpr bool kSplit = MM <= 2;
    __m512 ae[MM], ao[MM], ae1[MM], ao1[MM];
    for (int m = 0; m < MM; ++m) ae[m] = ao[m] = ae1[m] = ao1[m] = _mm512_setzero_ps();
    for (int64_t p = g * ppg; p < (g + 1) * ppg; ++p) {
      prefetch_ahead(tp + p * bits * 16);
      const __m512i codes = pair_codes(c, tp + p * bits * 16, bits);
      const __m512i a0 = _mm512_permutexvar_epi16(codes, c.table);                          // rows 2q, 2t
      const __m512i b0 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), c.table);   // rows 2q+1, 2t
      const __m512i a1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 8), c.table);   // rows 2q, 2t+1
      const __m512i b1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 12), c.table);  // rows 2q+1, 2t+1
      for (int m = 0; m < MM; ++m) {
        const uint64_t* xp = xq + ((m0 + m) * P + p) * 2;
        const __m512i x0 = _mm512_set1_epi64(static_cast<long long>(xp[0]));
        const __m512i x1 = _mm512_set1_epi64(static_cast<long long>(xp[1]));
        if constexpr (kSplit) {
          ae[m] = _mm512_dpbf16_ps(ae[m], as_bh(a0), as_bh(x0));
          ae1[m] = _mm512_dpbf16_ps(ae1[m], as_bh(a1), as_bh(x1));
          ao[m] = _mm512_dpbf16_ps(ao[m], as_bh(b0), as_bh(x0));
          ao1[m] = _mm512_dpbf16_ps(ao1[m], as_bh(b1), as_bh(x1));
        } else {
          ae[m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ae[m], as_bh(a0), as_bh(x0)), as_bh(a1), as_bh(x1));
          ao[m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ao[m], as_bh(b0), as_bh(x0)), as_bh(b1), as_bh(x1));
        }
      }
    }
    const __m512 sc = _mm512_loadu_ps(scale + (t * G + g) * 16);
    const __m512 of = _mm512_loadu_ps(offset + (t * G + g) * 16);
    const __m512 sce = _mm512_permutexvar_ps(c.even_rows, sc), sco = _mm512_permutexvar_ps(c.odd_rows, sc);
    for (int m = 0; m < MM; ++m) {
      ye[m] = _mm512_fmadd_ps(sce, kSplit ? _mm512_add_ps(ae[m], ae1[m]) : ae[m], ye[m]);
      yo[m] = _mm512_fmadd_ps(sco, kSplit ? _mm512_add_ps(ao[m], ao1[m]) : ao[m], yo[m]);
      yoff[m] = _mm512_fmadd_ps(of, _mm512_set1_ps(gsum[(m0 + m) * G + g]), yoff[m]);
    }
  }
  for (int m = 0; m < MM; ++m) {
    const __m512 rows = _mm512_add_ps(_mm512_permutex2var_ps(ye[m], c.pick1, yo[m]),
                                      _mm512_permutex2var_ps(ye[m], c.pick2, yo[m]));
    _mm512_storeu_ps(res[m], _mm512_add_ps(rows, yoff[m]));
  }
}


// ---- 1-3 planes: bf16 words straight out of gf2p8affineqb ------------------------------------------------
// With at most 3 planes the transpose can write finished bf16 words, so the nibble-to-bf16 step above
// (3 shifts and 4 vpermw per 8 weights and 16 rows) goes. In a qword of row r, data byte i (qword byte
// 7 - i) is plane i - 4 of row r for i = 4 .. 3 + bits, 0x00 for the planes the width lacks, 0xFF elsewhere;
// transposed with the input byte 1 << j at even positions and 0 at odd ones, and the constant 0x0F, word t
// becomes (0x0F << 8) | 0x80 | code(r, j_t) << 4: the bf16 value 2^-99 * (8 + code), exactly (sign 0,
// exponent 31, mantissa code / 8). One vpermb serves 8 rows, one gf2p8affineqb 8 rows x 4 weights.
// So sum_k x_k (8 + q_k) 2^-99 is what the dot products add up (exact products, fp32 sums), and
// sum_k x_k q_k = 2^99 * that - 8 * sum_k x_k: per group, y += (2^99 scale) acc + (offset - 8 scale) gsum.
// The factor 2^-99 only moves the exponent: a product underflows (vdpbf16ps flushes it) only for
// |x| < 2^-27 / 15, about 7e-10, whose products are below 1e-8 of a unit activation's.
constexpr int kDirectMaxBits = 3;

struct DirectConsts {
  __m512i gather_lo, gather_hi;  // rows 0-7 / 8-15 into the 8 qwords
  __mmask64 from_raw;            // the bytes the gathers take from the planes (the rest: 0xFF)
  __m512i pick_lo, pick_hi;      // the input bytes: weights 0-3 / 4-7 of the pair
  __m512i rows_lo, rows_hi;      // lane l of an accumulator belongs to row l / 2 (+ 8)
  __m512i pair_even, pair_odd;   // the two lanes of row r from the lo (r < 8) and hi accumulators
};

inline DirectConsts direct_consts(int bits) {
  DirectConsts c;
  alignas(64) uint8_t lo[64], hi[64], xl[64], xh[64];
  uint64_t from_raw = 0;
  for (int q = 0; q < 8; ++q)
    for (int i = 0; i < 8; ++i) {
      const int b = 8 * q + 7 - i;  // qword byte of data byte i
      lo[b] = hi[b] = 0;
      if (i >= 4 && i < 7) {
        from_raw |= uint64_t{1} << b;
        // plane i - 4 of row q (or 8 + q); a plane past the width reads byte 63, zero in the masked load
        lo[b] = static_cast<uint8_t>(i - 4 < bits ? (i - 4) * 16 + q : 63);
        hi[b] = static_cast<uint8_t>(i - 4 < bits ? (i - 4) * 16 + 8 + q : 63);
      }
    }
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) {
      xl[8 * q + j] = (j % 2 == 0) ? static_cast<uint8_t>(1 << (j / 2)) : 0;
      xh[8 * q + j] = (j % 2 == 0) ? static_cast<uint8_t>(1 << (4 + j / 2)) : 0;
    }
  c.gather_lo = _mm512_load_si512(lo);
  c.gather_hi = _mm512_load_si512(hi);
  c.from_raw = from_raw;
  c.pick_lo = _mm512_load_si512(xl);
  c.pick_hi = _mm512_load_si512(xh);
  alignas(64) int32_t rl[16], rh[16], pe[16], po[16];
  for (int l = 0; l < 16; ++l) {
    rl[l] = l / 2;
    rh[l] = 8 + l / 2;
    // row l: lanes 2l, 2l + 1 of the lo accumulator (l < 8) or 2(l - 8), 2(l - 8) + 1 of the hi one (+16)
    pe[l] = l < 8 ? 2 * l : 16 + 2 * (l - 8);
    po[l] = pe[l] + 1;
  }
  c.rows_lo = _mm512_load_si512(rl);
  c.rows_hi = _mm512_load_si512(rh);
  c.pair_even = _mm512_load_si512(pe);
  c.pair_odd = _mm512_load_si512(po);
  return c;
}

// out rows for one tile, like tile() above; xb: x in bf16, KP per row (zero past K), read 4 weights at a
// time. Two accumulators per half of the tile (weights 0-3, 4-7) keep four independent chains of dot
// products at one row of x, where one chain would wait on the instruction's latency.
template <int MM>
inline void tile_direct(float (*res)[16], const DirectConsts& c, const uint8_t* tp, const float* scale,
                        const float* offset, const uint16_t* xb, const float* gsum, int64_t m0, int64_t t,
                        int64_t KP, int bits, int64_t group) {
  const int64_t P = KP / 8, G = KP / group, ppg = group / 8;
  const __mmask64 load_mask = (uint64_t{1} << (16 * bits)) - 1;
  const __m512i ones = _mm512_set1_epi8(-1);
  const __m512 unbias = _mm512_set1_ps(0x1p99f), eight = _mm512_set1_ps(8.f);
  __m512 ylo[MM], yhi[MM], yoff[MM];
  for (int m = 0; m < MM; ++m) ylo[m] = yhi[m] = yoff[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // Four chains per row of x at one or two rows (latency-bound otherwise); two from three rows on,
    // where the rows' chains are enough and more accumulators would not fit the 32 registers.
    constexpr int C = MM <= 2 ? 4 : 2, c1 = C == 4 ? 1 : 0, c2 = C == 4 ? 2 : 1, c3 = C == 4 ? 3 : 1;
    __m512 a[MM][C];
    for (int m = 0; m < MM; ++m)
      for (int i = 0; i < C; ++i) a[m][i] = _mm512_setzero_ps();
    for (int64_t p = g * ppg; p < (g + 1) * ppg; ++p) {
      prefetch_ahead(tp + p * bits * 16);
      const __m512i raw = _mm512_maskz_loadu_epi8(load_mask, tp + p * bits * 16);
      const __m512i dlo = _mm512_mask_permutexvar_epi8(ones, c.from_raw, c.gather_lo, raw);
      const __m512i dhi = _mm512_mask_permutexvar_epi8(ones, c.from_raw, c.gather_hi, raw);
      const __m512i w0 = _mm512_gf2p8affine_epi64_epi8(c.pick_lo, dlo, 0x0F);  // rows 0-7, weights 0-3
      const __m512i w1 = _mm512_gf2p8affine_epi64_epi8(c.pick_hi, dlo, 0x0F);  // rows 0-7, weights 4-7
      const __m512i w2 = _mm512_gf2p8affine_epi64_epi8(c.pick_lo, dhi, 0x0F);  // rows 8-15, weights 0-3
      const __m512i w3 = _mm512_gf2p8affine_epi64_epi8(c.pick_hi, dhi, 0x0F);  // rows 8-15, weights 4-7
      for (int m = 0; m < MM; ++m) {
        long long x0, x1;
        std::memcpy(&x0, xb + (m0 + m) * KP + 8 * p, 8);
        std::memcpy(&x1, xb + (m0 + m) * KP + 8 * p + 4, 8);
        const __m512i v0 = _mm512_set1_epi64(x0), v1 = _mm512_set1_epi64(x1);
        a[m][0] = _mm512_dpbf16_ps(a[m][0], as_bh(w0), as_bh(v0));
        a[m][c1] = _mm512_dpbf16_ps(a[m][c1], as_bh(w1), as_bh(v1));
        a[m][c2] = _mm512_dpbf16_ps(a[m][c2], as_bh(w2), as_bh(v0));
        a[m][c3] = _mm512_dpbf16_ps(a[m][c3], as_bh(w3), as_bh(v1));
      }
    }
    const __m512 sc = _mm512_loadu_ps(scale + (t * G + g) * 16);
    const __m512 of = _mm512_sub_ps(_mm512_loadu_ps(offset + (t * G + g) * 16), _mm512_mul_ps(eight, sc));
    const __m512 sc_u = _mm512_mul_ps(sc, unbias);
    const __m512 slo = _mm512_permutexvar_ps(c.rows_lo, sc_u), shi = _mm512_permutexvar_ps(c.rows_hi, sc_u);
    for (int m = 0; m < MM; ++m) {
      const __m512 lo = C == 4 ? _mm512_add_ps(a[m][0], a[m][c1]) : a[m][0];
      const __m512 hi = C == 4 ? _mm512_add_ps(a[m][c2], a[m][c3]) : a[m][c2];
      ylo[m] = _mm512_fmadd_ps(slo, lo, ylo[m]);
      yhi[m] = _mm512_fmadd_ps(shi, hi, yhi[m]);
      yoff[m] = _mm512_fmadd_ps(of, _mm512_set1_ps(gsum[(m0 + m) * G + g]), yoff[m]);
    }
  }
  for (int m = 0; m < MM; ++m) {
    const __m512 rows = _mm512_add_ps(_mm512_permutex2var_ps(ylo[m], c.pair_even, yhi[m]),
                                      _mm512_permutex2var_ps(ylo[m], c.pair_odd, yhi[m]));
    _mm512_storeu_ps(res[m], _mm512_add_ps(rows, yoff[m]));
  }
}

}  // namespace dp
}  // namespace tcpu
#endif
