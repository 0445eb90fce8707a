// The bit-plane product with 8-bit activations (act_bits = 8; LLM(activation_bits=8)): each row of x is
// quantized per weight group to int8 with an fp32 scale (symmetric, round to nearest even, as llama.cpp's
// Q8 activations are), and the product of the codes and the int8 activations is an exact integer sum:
//
//   out[m, n] = sum_g (scale[n, g] * dot[m, n, g]) * sx[m, g] + offset[n, g] * sxq[m, g],
//   dot[m, n, g] = sum_{k in g} q[n, k] qx[m, k],  sxq[m, g] = sx[m, g] * sum_{k in g} qx[m, k]
//
// Why: on CPUs whose vector units are narrow (the 2-core Zen 1 EPYC: 256-bit ops split in two, cross-lane
// permutes three micro-ops) the lookup-table kernel's permutes bound decode at about a third of llama.cpp's
// speed. Integer dot products (vpmaddubsw: 32 byte products a instruction) do the multiply-adds; the planes
// are turned into codes in registers by a bit transpose, so the storage stays bit planes.
//
// Codes from planes (up to four planes at a time): per row, the four plane bytes of an 8-weight pair make a
// 32-bit word, bit 8i + j = bit i of weight j's code. Exchanging index bits i1<->j1 and i0<->j0 of the bit
// positions moves bit i of weight j to 8 (j & 3) + 4 (j >> 2) + i: byte b then holds the code of weight b in
// its low nibble and of weight b + 4 in its high one, ready for vpmaddubsw against the activations
// [x0..x3] and [x4..x7]. The exchanges are delta swaps between the planes' 16-row vectors before the words
// are gathered (128-bit operations: on the Zen 1 EPYC a 256-bit one is two). 5-8 planes: the high four
// planes the same way, their sum times 16.
//
// Numerics: the integer sums are exact, and convert to fp32 exactly while |sum| < 2^24 (groups of up to 512
// weights at 8 bits, 8,192 at 4); then the fp32 epilogue above, per group: a multiply and two fmas, in that
// order. It is not dequantize-then-matmul: x is rounded to 8 bits, as in llama.cpp's and the bipolar-INT
// paper's integer products. The portable path computes the same integers and the same fp32 epilogue: every
// path, the same bits.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__GFNI__) && defined(__AVX512BW__)
#define TCPU_I8_VNNI 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "prefetch.h"

namespace tcpu {
namespace i8 {

constexpr int kRows = 16;
#if defined(TCPU_I8_VNNI)
constexpr int kMaxM = 8;  // rows of x that share each pair's codes (32 zmm registers: 16 accumulators)
#else
constexpr int kMaxM = 4;
#endif

// qx[m * KP + k], sx[m * G + g] and sxq[m * G + g] (sx times the group's sum of qx: the offsets' factor) for
// rows of x already widened to fp32 and zero-padded to KP.
inline void quantize_x(const float* xf, int64_t M, int64_t KP, int64_t group, int8_t* qx, float* sx, float* sxq) {
  const int64_t G = KP / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* v = xf + m * KP + g * group;
      float amax = 0.f;
      for (int64_t k = 0; k < group; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t s = 0;
      for (int64_t k = 0; k < group; ++k) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(v[k] * inv));
        qx[m * KP + g * group + k] = static_cast<int8_t>(std::min(127, std::max(-127, q)));
        s += qx[m * KP + g * group + k];
      }
      sx[m * G + g] = amax / 127.f;
      sxq[m * G + g] = sx[m * G + g] * static_cast<float>(s);  // the sum is exact: |s| <= 127 * group < 2^24
    }
}

#if defined(TCPU_I8_VNNI)
// AVX512-VNNI + VBMI + GFNI (Zen 4/5, Ice Lake and later): the same integers with one transpose
// instruction and one dot-product instruction where the AVX2 path needs swaps and four.
//   1. one vpermt2b per 8 rows gathers, into the row's qword, 8 plane bytes ("slots", byte 7 - s holds slot
//      s, as gf2p8affineqb wants): slot s is plane s % fw of pair p + s / fw, zero past the width;
//   2. one gf2p8affineqb transposes each qword's 8x8 bit matrix: byte j of the qword holds, in its fw-bit
//      field q, the code of weight j of pair p + q (fw = 8 for 5-8 planes: the whole byte is the code);
//   3. per field, a shift and a mask give the codes as unsigned bytes, and one vpdpbusd per 8 rows and row of
//      x adds their products with 8 int8 activations (x broadcast as a qword) into int32 lanes: dword 2r
//      of the accumulator sums weights 0-3 of row r, dword 2r + 1 weights 4-7, added once per group (exact:
//      integers, then one conversion; see tile).
// fw is the narrowest of 1, 2, 4, 8 that holds the width and whose 8 / fw pairs the group's pairs divide
// into, so fewer planes mean fewer gathers and transposes per weight.
struct Consts {
  __m512i gather[2], eye, interleave, rows;
  __mmask64 keep[2], load_lo, load_hi;
  bool full_lo, full_hi;
  int fw;
};

inline Consts consts(int bits, int64_t ppg) {
  Consts c;
  c.fw = bits <= 1 ? 1 : bits <= 2 ? 2 : bits <= 4 ? 4 : 8;
  while (ppg % (8 / c.fw) != 0) c.fw *= 2;
  for (int h = 0; h < 2; ++h) {
    alignas(64) uint8_t g[64];
    uint64_t keep = 0;
    for (int rr = 0; rr < 8; ++rr)
      for (int s = 0; s < 8; ++s) {
        const int plane = s % c.fw, pair = s / c.fw, at = 8 * rr + 7 - s;
        g[at] = static_cast<uint8_t>(plane < bits ? ((pair * bits + plane) * 16 + 8 * h + rr) : 0);
        if (plane < bits) keep |= uint64_t{1} << at;
      }
    c.gather[h] = _mm512_load_si512(g);
    c.keep[h] = keep;
  }
  const int window = 8 / c.fw * bits * 16;  // bytes of the 8 / fw pairs one qword covers (at most 128)
  c.load_lo = window >= 64 ? ~uint64_t{0} : (uint64_t{1} << window) - 1;
  c.load_hi = window >= 128 ? ~uint64_t{0} : window <= 64 ? 0 : (uint64_t{1} << (window - 64)) - 1;
  c.full_lo = window >= 64;
  c.full_hi = window >= 128;
  c.eye = _mm512_set1_epi64(0x8040201008040201LL);  // byte j = 1 << j: gf2p8affine then transposes
  alignas(64) int32_t il[16], rows[16];
  for (int l = 0; l < 16; ++l) {
    il[l] = l % 2 == 0 ? l / 2 : 8 + l / 2;  // lane l of the interleaved order holds this row
    rows[l] = l < 8 ? 2 * l : 2 * (l - 8) + 1;  // row l sits in this lane of the interleaved order
  }
  c.interleave = _mm512_load_si512(il);
  c.rows = _mm512_load_si512(rows);
  return c;
}

// acc[m][h] += the products of group g's codes and rows m0 .. m0 + MM of x; FW: the field width (a
// constant, so that the field loop unrolls with immediate shifts and the accumulators stay in registers).
template <int MM, int FW>
inline void group_dot(__m512i (&acc)[MM][2], const Consts& c, const uint8_t* tt, const int8_t* qx, int64_t m0,
                      int64_t g, int64_t ppg, int64_t KP, int bits) {
  constexpr int pairs = 8 / FW;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>(FW == 8 ? 0xFF : (1 << FW) - 1));
  for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t p = g * ppg; p < (g + 1) * ppg; p += pairs) {
    const uint8_t* src = tt + p * bits * 16;
    prefetch_ahead(src, 2);
    // Plain loads where the window is whole (most widths at group 64): a little faster than masked ones.
    const __m512i lo = c.full_lo ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(c.load_lo, src);
    const __m512i hi = c.full_hi ? _mm512_loadu_si512(src + 64) : _mm512_maskz_loadu_epi8(c.load_hi, src + 64);
    __m512i w[2];
    for (int h = 0; h < 2; ++h)
      w[h] = _mm512_gf2p8affine_epi64_epi8(c.eye, _mm512_maskz_permutex2var_epi8(c.keep[h], lo, c.gather[h], hi), 0);
    for (int q = 0; q < pairs; ++q) {
      __m512i code[2];
      for (int h = 0; h < 2; ++h)  // 16-bit shifts: the mask drops the bits that crossed from the next byte
        code[h] = FW == 8 ? w[h] : _mm512_and_si512(q == 0 ? w[h] : _mm512_srli_epi16(w[h], q * FW), mask);
      const int8_t* xp = qx + m0 * KP + 8 * (p + q);
      for (int m = 0; m < MM; ++m) {
        int64_t xq;
        std::memcpy(&xq, xp + m * KP, 8);
        const __m512i vx = _mm512_set1_epi64(xq);
        for (int h = 0; h < 2; ++h) acc[m][h] = _mm512_dpbusd_epi32(acc[m][h], code[h], vx);
      }
    }
  }
}

// res[m][0 .. 16) for rows m0 .. m0 + MM of x against tile t (tt: its planes).
template <int MM>
void tile(float (*res)[kRows], const Consts& c, const uint8_t* tt, const float* scale, const float* offset,
          const int8_t* qx, const float* sx, const float* sxq, int64_t m0, int64_t t, int64_t KP, int bits,
          int64_t group) {
  const int64_t G = KP / group, ppg = group / 8;
  // The fp32 sums live in res (L1), not in registers: 2 MM accumulators, the codes and the constants take
  // the 32 vector registers.
  for (int m = 0; m < MM; ++m) _mm512_storeu_ps(res[m], _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MM][2];
    switch (c.fw) {
      case 1: group_dot<MM, 1>(acc, c, tt, qx, m0, g, ppg, KP, bits); break;
      case 2: group_dot<MM, 2>(acc, c, tt, qx, m0, g, ppg, KP, bits); break;
      case 4: group_dot<MM, 4>(acc, c, tt, qx, m0, g, ppg, KP, bits); break;
      default: group_dot<MM, 8>(acc, c, tt, qx, m0, g, ppg, KP, bits);
    }
    // The sums in the interleaved row order [0, 8, 1, 9, ..., 7, 15]: lane 2r adds rows-0-7's dwords 2r and
    // 2r + 1 (row r), lane 2r + 1 rows-8-15's (row 8 + r), with two blends, a swap of neighbours and an add,
    // where putting them in row order took two cross-lane permutes a row of x and group (a fifth of the
    // kernel at 64 rows). The group's scales and offsets take that order instead (two permutes a group),
    // and the sums are put back in row order once a tile.
    const __m512 sc = _mm512_permutexvar_ps(c.interleave, _mm512_loadu_ps(scale + (t * G + g) * kRows));
    const __m512 of = _mm512_permutexvar_ps(c.interleave, _mm512_loadu_ps(offset + (t * G + g) * kRows));
    for (int m = 0; m < MM; ++m) {
      const __m512i dot = _mm512_add_epi32(
          _mm512_mask_blend_epi32(0xAAAA, acc[m][0], acc[m][1]),
          _mm512_shuffle_epi32(_mm512_mask_blend_epi32(0xAAAA, acc[m][1], acc[m][0]), _MM_PERM_CDAB));
      const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_cvtepi32_ps(dot)), _mm512_set1_ps(sx[(m0 + m) * G + g]),
                                       _mm512_loadu_ps(res[m]));
      _mm512_storeu_ps(res[m], _mm512_fmadd_ps(of, _mm512_set1_ps(sxq[(m0 + m) * G + g]), y));
    }
  }
  for (int m = 0; m < MM; ++m) _mm512_storeu_ps(res[m], _mm512_permutexvar_ps(c.rows, _mm512_loadu_ps(res[m])));
}
#elif defined(__AVX2__) && defined(__FMA__)
// Exchanges the bits of a at the positions of mask << shift with b's at the positions of mask (a delta
// swap between two vectors of bytes; 16-bit shifts, the mask keeps bits from crossing bytes).
inline void swap_bits(__m128i& a, __m128i& b, int shift, char mask) {
  const __m128i t = _mm_and_si128(_mm_xor_si128(_mm_srli_epi16(a, shift), b), _mm_set1_epi8(mask));
  b = _mm_xor_si128(b, t);
  a = _mm_xor_si128(a, _mm_slli_epi16(t, shift));
}

// Per row, a 32-bit word of four plane bytes ("slots") with the bit-index swaps done (see the header):
// slot s holds plane i0 + s % fw of pair p + s / fw (zero past the width), so after the swaps bit
// (s, j) sits at 8 (j & 3) + 4 (j >> 2) + s, and the fw-bit field at 4n + q fw of byte b is the code of
// weight 4n + b of pair p + q. fw = 4: one pair and up to four planes; fw = 2 (2 planes) and fw = 1 (1
// plane): two and four pairs a word, so the swaps and gathers per weight shrink with the width. w[0]: rows
// 0-7, w[1]: rows 8-15.
inline void plane_words(const uint8_t* tt, int64_t p, int bits, int i0, int fw, __m256i w[2]) {
  __m128i v[4];
  for (int s = 0; s < 4; ++s) {
    const int plane = i0 + s % fw;
    v[s] = plane < bits && plane < i0 + fw
               ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(tt + ((p + s / fw) * bits + plane) * 16))
               : _mm_setzero_si128();
  }
  swap_bits(v[0], v[2], 2, 0x33);
  swap_bits(v[1], v[3], 2, 0x33);
  swap_bits(v[0], v[1], 1, 0x55);
  swap_bits(v[2], v[3], 1, 0x55);
  const __m128i a = _mm_unpacklo_epi8(v[0], v[1]), b = _mm_unpackhi_epi8(v[0], v[1]);
  const __m128i c = _mm_unpacklo_epi8(v[2], v[3]), d = _mm_unpackhi_epi8(v[2], v[3]);
  w[0] = _mm256_set_m128i(_mm_unpackhi_epi16(a, c), _mm_unpacklo_epi16(a, c));
  w[1] = _mm256_set_m128i(_mm_unpackhi_epi16(b, d), _mm_unpacklo_epi16(b, d));
}

// dot[m][h] = the int32 sums over group g of codes (planes [i0, i0 + 4)) times x, rows 8h .. 8h + 7.
// PW: pairs a word (1, 2 or 4; see plane_words), a constant so that the field shifts are immediates.
template <int MM, int PW>
inline void group_dot(__m256i (&dot)[MM][2], const uint8_t* tt, const int8_t* qx, int64_t m0, int64_t g, int64_t ppg,
                      int64_t KP, int bits, int i0) {
  constexpr int per_word = PW, fw = 4 / PW;
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(static_cast<char>((1 << fw) - 1));
  for (int m = 0; m < MM; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
  for (int64_t p = g * ppg; p < (g + 1) * ppg; p += per_word) {
    __m256i w[2];
    if (i0 == 0) prefetch_ahead(tt + p * bits * 16, bits > 4 ? 2 : 1);
    plane_words(tt, p, bits, i0, fw, w);
    for (int q = 0; q < per_word; ++q) {
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        lo[h] = _mm256_and_si256(_mm256_srli_epi32(w[h], q * fw), mask);
        hi[h] = _mm256_and_si256(_mm256_srli_epi32(w[h], 4 + q * fw), mask);
      }
      for (int m = 0; m < MM; ++m) {
        int32_t x0, x1;
        std::memcpy(&x0, qx + (m0 + m) * KP + 8 * (p + q), 4);
        std::memcpy(&x1, qx + (m0 + m) * KP + 8 * (p + q) + 4, 4);
        const __m256i vx0 = _mm256_set1_epi32(x0), vx1 = _mm256_set1_epi32(x1);
        for (int h = 0; h < 2; ++h)  // each 16-bit sum is of 4 products of at most 15 * 127: no saturation
          dot[m][h] = _mm256_add_epi32(dot[m][h], _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[h], vx0),
                                                                                     _mm256_maddubs_epi16(hi[h], vx1)), ones));
      }
    }
  }
}

struct Consts {};  // the AVX2 path decides per group (tile)
inline Consts consts(int, int64_t) { return {}; }

// res[m][0 .. 16) for rows m0 .. m0 + MM of x against tile t (tt: its planes).
template <int MM>
void tile(float (*res)[kRows], const Consts&, const uint8_t* tt, const float* scale, const float* offset,
          const int8_t* qx, const float* sx, const float* sxq, int64_t m0, int64_t t, int64_t KP, int bits,
          int64_t group) {
  const int64_t G = KP / group, ppg = group / 8;
  __m256 y[MM][2];
  for (int m = 0; m < MM; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MM][2];
    // Pairs a word: as many as the width allows and the group's pairs divide into (a word never spans groups).
    if (bits == 1 && ppg % 4 == 0)
      group_dot<MM, 4>(acc, tt, qx, m0, g, ppg, KP, bits, 0);
    else if (bits <= 2 && ppg % 2 == 0)
      group_dot<MM, 2>(acc, tt, qx, m0, g, ppg, KP, bits, 0);
    else
      group_dot<MM, 1>(acc, tt, qx, m0, g, ppg, KP, bits, 0);
    if (bits > 4) {  // planes 4-7: their sums times 16
      __m256i high[MM][2];
      group_dot<MM, 1>(high, tt, qx, m0, g, ppg, KP, bits, 4);
      for (int m = 0; m < MM; ++m)
        for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_slli_epi32(high[m][h], 4));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_loadu_ps(scale + (t * G + g) * kRows + 8 * h);
      const __m256 of = _mm256_loadu_ps(offset + (t * G + g) * kRows + 8 * h);
      for (int m = 0; m < MM; ++m) {
        const __m256 dot = _mm256_mul_ps(sc, _mm256_cvtepi32_ps(acc[m][h]));
        y[m][h] = _mm256_fmadd_ps(dot, _mm256_set1_ps(sx[(m0 + m) * G + g]), y[m][h]);
        y[m][h] = _mm256_fmadd_ps(of, _mm256_set1_ps(sxq[(m0 + m) * G + g]), y[m][h]);
      }
    }
  }
  for (int m = 0; m < MM; ++m) {
    _mm256_storeu_ps(res[m], y[m][0]);
    _mm256_storeu_ps(res[m] + 8, y[m][1]);
  }
}
#else
// Portable: the same integers and the same fp32 epilogue, one row at a time.
struct Consts {};
inline Consts consts(int, int64_t) { return {}; }

template <int MM>
void tile(float (*res)[kRows], const Consts&, const uint8_t* tt, const float* scale, const float* offset,
          const int8_t* qx, const float* sx, const float* sxq, int64_t m0, int64_t t, int64_t KP, int bits,
          int64_t group) {
  const int64_t G = KP / group, ppg = group / 8;
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < kRows; ++r) {
      float y = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int64_t p = g * ppg; p < (g + 1) * ppg; ++p)
          for (int j = 0; j < 8; ++j) {
            int32_t code = 0;
            for (int i = 0; i < bits; ++i) code |= ((tt[(p * bits + i) * 16 + r] >> j) & 1) << i;
            dot += code * qx[(m0 + m) * KP + 8 * p + j];
          }
        const float sc = scale[(t * G + g) * kRows + r], of = offset[(t * G + g) * kRows + r];
        y = __builtin_fmaf(sc * static_cast<float>(dot), sx[(m0 + m) * G + g], y);
        y = __builtin_fmaf(of, sxq[(m0 + m) * G + g], y);
      }
      res[m][r] = y;
    }
}
#endif

}  // namespace i8
}  // namespace tcpu
