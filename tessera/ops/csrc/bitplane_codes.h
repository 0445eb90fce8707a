// The codes of one 8-weight column pair of a bit-plane tile, at any width (1-8 planes), for the kernels
// that dequantize (bitplane_linear.cpp's dequantize_cols, bitplane_gemm.cpp's VNNI blocks).
// bitplane_dp.h rebuilds codes faster by bit transpose where AVX512-VBMI/GFNI exist and the width is
// small; this is the generic path: a mask test and a masked add per plane and weight.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

namespace tcpu {

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

}  // namespace tcpu
#endif
