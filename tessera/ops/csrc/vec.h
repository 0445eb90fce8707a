// A small SIMD layer shared by tessera's CPU kernels: one fp32 vector type `VF` of kLanes floats,
// loads from / stores to fp32, bf16 and fp16 memory, and the few float ops the kernels use.
//
// The ISA is chosen at compile time from what -march=native enabled (the build is cached per CPU,
// see tessera/ops/cpu_kernels.py): AVX-512F (16 lanes), AVX2+FMA+F16C (8 lanes), otherwise a
// portable array-of-8 that the compiler vectorises as it can (NEON, SSE).
//
// Every op here is exact IEEE single precision with no reassociation; the module is built with
// -ffp-contract=off, so a*b+c is two roundings unless fma() is called explicitly. The elementwise
// kernels rely on that to reproduce torch's results bit for bit; the attention kernel calls fma().
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tcpu {

using bf16 = c10::BFloat16;
using f16 = c10::Half;

// ---- scalar conversions (c10's own: round to nearest even) ------------------------------------
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }
inline float to_float(f16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float f) { return T(f); }
template <>
inline float from_float<float>(float f) { return f; }

// Round a float to T's precision and back: the rounding torch applies when it stores an
// intermediate result in a T tensor.
template <typename T>
inline float round_to(float f) { return to_float(from_float<T>(f)); }

// ---- Sleef's expf_u10, the exp torch's vectorised CPU kernels call (Sleef_expf{4,8,16}_u10) ------
// Same constants, same fma steps, so F.silu and friends can be reproduced bit for bit.
constexpr float kR_LN2f = 1.442695040888963407359924681001892137426645954152985934135449406931f;
constexpr float kL2Uf = 0.693145751953125f;
constexpr float kL2Lf = 1.428606765330187045e-06f;
constexpr float kExpC0 = 0.000198527617612853646278381f;
constexpr float kExpC1 = 0.00139304355252534151077271f;
constexpr float kExpC2 = 0.00833336077630519866943359f;
constexpr float kExpC3 = 0.0416664853692054748535156f;
constexpr float kExpC4 = 0.166666671633720397949219f;
constexpr float kExpC5 = 0.5f;

inline float pow2i(int32_t q) {
  const uint32_t bits = static_cast<uint32_t>(q + 0x7f) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float sleef_expf(float d) {
  const int32_t q = static_cast<int32_t>(std::nearbyint(d * kR_LN2f));
  const float qf = static_cast<float>(q);
  float s = __builtin_fmaf(qf, -kL2Uf, d);
  s = __builtin_fmaf(qf, -kL2Lf, s);
  float u = kExpC0;
  u = __builtin_fmaf(u, s, kExpC1);
  u = __builtin_fmaf(u, s, kExpC2);
  u = __builtin_fmaf(u, s, kExpC3);
  u = __builtin_fmaf(u, s, kExpC4);
  u = __builtin_fmaf(u, s, kExpC5);
  u = 1.0f + __builtin_fmaf(s * s, u, s);
  u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
  if (d < -104.f) u = 0.f;
  if (100.f < d) u = std::numeric_limits<float>::infinity();
  return u;
}

#if defined(__AVX512F__)
// ================================ AVX-512F: 16 lanes ============================================
#define TCPU_ISA "avx512"
constexpr int kLanes = 16;
struct VF {
  __m512 v;
};
inline VF vzero() { return {_mm512_setzero_ps()}; }
inline VF vset1(float x) { return {_mm512_set1_ps(x)}; }
inline VF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VF vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline VF vload(const f16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline void vstore(bf16* p, VF a) {
  // c10::BFloat16's rounding: nearest even, NaN -> 0x7FC0.
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void vstore(f16* p, VF a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline VF operator+(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VF fma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a*b+c, one rounding
inline VF vmax(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float reduce_add(VF a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(VF a) { return _mm512_reduce_max_ps(a.v); }
// Lanes [n, kLanes) replaced by x.
inline VF keep_first(VF a, int n, float x) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  return {_mm512_mask_mov_ps(_mm512_set1_ps(x), m, a.v)};
}
inline VF vexp(VF d) {  // Sleef_expf16_u10
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d.v, _mm512_set1_ps(kR_LN2f)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-kL2Uf), d.v);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-kL2Lf), s);
  __m512 u = _mm512_set1_ps(kExpC0);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpC1));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpC2));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpC3));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpC4));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpC5));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  const __m512i q1 = _mm512_srai_epi32(q, 1), q2 = _mm512_sub_epi32(q, q1);
  const __m512i bias = _mm512_set1_epi32(0x7f);
  u = _mm512_mul_ps(u, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q1, bias), 23)));
  u = _mm512_mul_ps(u, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q2, bias), 23)));
  u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(d.v, _mm512_set1_ps(-104.f), _CMP_LT_OQ), _mm512_setzero_ps());
  u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.f), d.v, _CMP_LT_OQ),
                         _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  return {u};
}
// Rounded to bf16 / fp16 precision (what a store and a load give), in registers.
inline VF vround_bf16(VF a) {
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return {_mm512_castsi512_ps(r)};
}
inline VF vround_f16(VF a) { return {_mm512_cvtph_ps(_mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))}; }
// 2*kLanes bf16 as two fp32 vectors, the even-indexed elements and the odd ones: a shift and a
// mask (no lane-crossing conversion). interleave() puts such a pair back in order.
inline void vload_pairs(const bf16* p, VF& even, VF& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even.v = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd.v = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void interleave(VF even, VF odd, VF& lo, VF& hi) {
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  lo.v = _mm512_permutex2var_ps(even.v, ilo, odd.v);
  hi.v = _mm512_permutex2var_ps(even.v, ihi, odd.v);
}
// r[i] = sum of the lanes of a[i], for kLanes vectors (a transpose-and-add tree: 45 ops, not 16
// horizontal sums).
inline VF reduce_add_transpose(const VF* a) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i].v, a[2 * i + 1].v), _mm512_unpackhi_ps(a[2 * i].v, a[2 * i + 1].v));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)))};
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// ================================ AVX2 + FMA + F16C: 8 lanes ====================================
#define TCPU_ISA "avx2"
constexpr int kLanes = 8;
struct VF {
  __m256 v;
};
inline VF vzero() { return {_mm256_setzero_ps()}; }
inline VF vset1(float x) { return {_mm256_set1_ps(x)}; }
inline VF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline VF vload(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline VF vload(const f16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
inline void vstore(bf16* p, VF a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // Values are < 2^16: the unsigned-saturating pack is exact; it packs within 128-bit halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void vstore(f16* p, VF a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline VF operator+(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VF fma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vmax(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float reduce_add(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(VF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VF keep_first(VF a, int n, float x) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
  return {_mm256_blendv_ps(_mm256_set1_ps(x), a.v, keep)};
}
inline VF vexp(VF d) {  // Sleef_expf8_u10
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d.v, _mm256_set1_ps(kR_LN2f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-kL2Uf), d.v);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-kL2Lf), s);
  __m256 u = _mm256_set1_ps(kExpC0);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpC1));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpC2));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpC3));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpC4));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpC5));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i q1 = _mm256_srai_epi32(q, 1), q2 = _mm256_sub_epi32(q, q1);
  const __m256i bias = _mm256_set1_epi32(0x7f);
  u = _mm256_mul_ps(u, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, bias), 23)));
  u = _mm256_mul_ps(u, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, bias), 23)));
  u = _mm256_blendv_ps(u, _mm256_setzero_ps(), _mm256_cmp_ps(d.v, _mm256_set1_ps(-104.f), _CMP_LT_OQ));
  u = _mm256_blendv_ps(u, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(_mm256_set1_ps(100.f), d.v, _CMP_LT_OQ));
  return {u};
}
inline VF vround_bf16(VF a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  return {_mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan))};
}
inline VF vround_f16(VF a) { return {_mm256_cvtph_ps(_mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))}; }
inline void vload_pairs(const bf16* p, VF& even, VF& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even.v = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd.v = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void interleave(VF even, VF odd, VF& lo, VF& hi) {
  const __m256 a = _mm256_unpacklo_ps(even.v, odd.v), b = _mm256_unpackhi_ps(even.v, odd.v);
  lo.v = _mm256_permute2f128_ps(a, b, 0x20);
  hi.v = _mm256_permute2f128_ps(a, b, 0x31);
}
inline VF reduce_add_transpose(const VF* a) {
  __m256 w[4], u[2];
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i].v, a[2 * i + 1].v), _mm256_unpackhi_ps(a[2 * i].v, a[2 * i + 1].v));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // u[0] holds a[0..3]'s partial sums in each 128-bit half, u[1] a[4..7]'s.
  return {_mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31))};
}

#else
// ================================ portable: 8 lanes as an array =================================
#define TCPU_ISA "portable"
constexpr int kLanes = 8;
struct VF {
  float v[kLanes];
};
#define TCPU_MAP(expr)                                   \
  VF r;                                                  \
  for (int i = 0; i < kLanes; ++i) r.v[i] = (expr);      \
  return r
inline VF vzero() { TCPU_MAP(0.f); }
inline VF vset1(float x) { TCPU_MAP(x); }
template <typename T>
inline VF vload(const T* p) { TCPU_MAP(to_float(p[i])); }
template <typename T>
inline void vstore(T* p, VF a) {
  for (int i = 0; i < kLanes; ++i) p[i] = from_float<T>(a.v[i]);
}
inline VF operator+(VF a, VF b) { TCPU_MAP(a.v[i] + b.v[i]); }
inline VF operator-(VF a, VF b) { TCPU_MAP(a.v[i] - b.v[i]); }
inline VF operator*(VF a, VF b) { TCPU_MAP(a.v[i] * b.v[i]); }
inline VF operator/(VF a, VF b) { TCPU_MAP(a.v[i] / b.v[i]); }
inline VF fma(VF a, VF b, VF c) { TCPU_MAP(__builtin_fmaf(a.v[i], b.v[i], c.v[i])); }
inline VF vmax(VF a, VF b) { TCPU_MAP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline VF keep_first(VF a, int n, float x) { TCPU_MAP(i < n ? a.v[i] : x); }
inline VF vexp(VF d) { TCPU_MAP(sleef_expf(d.v[i])); }
#undef TCPU_MAP
inline float reduce_add(VF a) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
inline float reduce_max(VF a) {
  float s = a.v[0];
  for (int i = 1; i < kLanes; ++i) s = a.v[i] > s ? a.v[i] : s;
  return s;
}
inline VF reduce_add_transpose(const VF* a) {
  VF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = reduce_add(a[i]);
  return r;
}
inline void vload_pairs(const bf16* p, VF& even, VF& odd) {
  for (int i = 0; i < kLanes; ++i) even.v[i] = to_float(p[2 * i]), odd.v[i] = to_float(p[2 * i + 1]);
}
inline VF vround_bf16(VF a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = round_to<bf16>(a.v[i]);
  return a;
}
inline VF vround_f16(VF a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = round_to<f16>(a.v[i]);
  return a;
}
inline void interleave(VF even, VF odd, VF& lo, VF& hi) {
  for (int i = 0; i < kLanes; ++i) {
    (i < kLanes / 2 ? lo : hi).v[(2 * i) % kLanes] = even.v[i];
    (i < kLanes / 2 ? lo : hi).v[(2 * i) % kLanes + 1] = odd.v[i];
  }
}
#endif

// ---- partial vectors (the last n < kLanes elements of a row) ----------------------------------
// Staged through a zero-padded buffer so a row's tail goes through exactly the same vector code as
// its body: every element's result is independent of its position.
template <typename T>
inline VF vload_n(const T* p, int n) {
  float tmp[kLanes] = {};
  for (int i = 0; i < n; ++i) tmp[i] = to_float(p[i]);
  return vload(tmp);
}
template <typename T>
inline void vstore_n(T* p, VF a, int n) {
  float tmp[kLanes];
  vstore(tmp, a);
  for (int i = 0; i < n; ++i) p[i] = from_float<T>(tmp[i]);
}

// x rounded to T's precision (identity for float), as a vector.
template <typename T>
inline VF vround(VF a) {
  if constexpr (std::is_same_v<T, bf16>) {
    return vround_bf16(a);
  } else if constexpr (std::is_same_v<T, f16>) {
    return vround_f16(a);
  } else {
    return a;
  }
}

}  // namespace tcpu
