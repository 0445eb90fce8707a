// The codes of one 8-weight column pair of a bit-plane tile, at any width (1-8 planes), for the kernels
// that dequantize (bitplane_linear.cpp's dequantize_cols, bitplane_gemm.cpp's VNNI blocks).
// bitplane_dp.h rebuilds codes faster by bit transpose where AVX512-VBMI/GFNI exist and the width is
// small; this is the generic path: a mask test and a masked add per plane and weight (AVX-512), or
// per 8 rows the planes packed four to a word and a multiply per weight (AVX2).
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

namespace tcpu {
#endif

#if defined(__AVX512F__)

// pair: `bits` planes of 16 bytes (byte r of plane i holds bit i of row r's 8 weights, weight j in bit j).
// code[j]: the 16 rows' codes of weight j, as int32.
inline void plane_codes_epi32(const uint8_t* pair, int bits, __m512i code[8]) {
  for (int j = 0; j < 8; ++j) code[j] = _mm512_setzero_si512();
  for (int i = 0; i < bits; ++i) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + i * 16)));
    const __m512i pw = _mm512_set1_epi32(1 << i);
    for (int j = 0; j < 8; ++j)
      code[j] = _mm512_mask_add_epi32(code[j], _mm512_test_epi32_mask(v, _mm512_set1_epi32(1 << j)), code[j], pw);
  }
}

#elif defined(__AVX2__)
// pair: as above. code[h][j]: the codes of rows 8h .. 8h + 7 at weight j, as int32.
// Four planes at a time are packed into one word per row, plane i in byte i - i0; then for each weight
// j, (word >> j) & 0x01010101 leaves bit j of each plane in its byte, and a multiply by 0x01020408
// sums the bytes with weights 1, 2, 4, 8 into byte 3 (no byte below it exceeds 14: no carry). That is
// 4 operations per weight and 8 rows for up to 4 planes, where a test-and-add per plane would be 3 a plane.
inline void plane_codes_epi32(const uint8_t* pair, int bits, __m256i code[2][8]) {
  const __m256i ones = _mm256_set1_epi32(0x01010101), weights = _mm256_set1_epi32(0x01020408);
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 8; ++j) code[h][j] = _mm256_setzero_si256();
    for (int i0 = 0; i0 < bits; i0 += 4) {
      __m256i word = _mm256_setzero_si256();
      for (int i = i0; i < bits && i < i0 + 4; ++i) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + i * 16 + 8 * h)));
        word = _mm256_or_si256(word, _mm256_slli_epi32(v, 8 * (i - i0)));
      }
      for (int j = 0; j < 8; ++j) {
        const __m256i bitsj = _mm256_and_si256(_mm256_srli_epi32(word, j), ones);
        const __m256i c = _mm256_srli_epi32(_mm256_mullo_epi32(bitsj, weights), 24);
        code[h][j] = _mm256_add_epi32(code[h][j], _mm256_slli_epi32(c, i0));
      }
    }
  }
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
}  // namespace tcpu
#endif
