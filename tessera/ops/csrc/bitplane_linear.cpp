// Linear layers on bit-plane weights (tessera/quant/bitplanes.py): out[M, N] = x[M, K] @ W^T (+ bias)
// with W[n, k] = scale[n, g] * q[n, k] + offset[n, g], q an N-bit code stored as N one-bit planes.
//
// The product never rebuilds W. It uses lookup tables over the activations (as T-MAC does for
// low-bit weights): for every 4 consecutive inputs x[4c..4c+3] a table of the 16 sums of their
// subsets, lut[c][e] = sum of x[4c + b] over the bits b set in e. A plane's 4 bits of one output row
// at chunk c select one entry, so
//
//   sum_k x_k q_k = sum_i 2^i * sum_c lut[c][nibble_i(n, c)],
//
// one table lookup per 4 weights per plane, and the lookups of 16 output rows are one vector
// permute (vpermps) with the rows in the lanes: no horizontal sums, and a group's scale and offset
// are vectors over the same 16 rows (offset * sum of the group's x).
//
// Layout ("tiles", made by tessera.quant.bitplanes.tile_planes): rows in tiles of 16; for each tile,
// each pair of chunks (8 inputs) and each plane, 16 bytes, byte r = nibble of row r at chunk 2p (low
// 4 bits) | nibble at chunk 2p + 1 (high 4 bits). A tile is read front to back, once per call
// whatever M is (the rows of x loop inside). Sums are in fp32; only their order differs from
// dequantize-then-matmul.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bitplane_codes.h"
#include "bitplane_dp.h"
#include "bitplane_i8.h"
#include "vec.h"

namespace tcpu {
// From this many planes up, bf16 x goes through bitplane_dp.h's kernel where it is built (its cost is
// the same for 1-4 planes; the tables' grows with the planes). Which is cheaper at few planes depends on
// the CPU (the tables at 1-2 planes on the 2-core Xeon, the dot products on the AMD EPYC), so
// tessera.quant.kernel_choice times both once per build and sets this (module._set_bitplane_dp_min_bits;
// 9 = never); 3 until it does.
int64_t dp_min_bits = 3;
int64_t set_bitplane_dp_min_bits(int64_t bits) {
  const int64_t before = dp_min_bits;
  dp_min_bits = bits;
  return before;
}

namespace {

constexpr int kRows = 16;  // output rows per tile
constexpr int kMB = 4;     // rows of x sharing one pass over a tile

// lut[m][c][16] for every row m of x (K_pad / 4 chunks).
void build_tables(const float* x, int64_t M, int64_t KP, float* lut) {
  const int64_t C = KP / 4;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * KP;
    for (int64_t c = 0; c < C; ++c) {
      // t[e] = the sum of v[b] over the bits b of e, lowest bit first: the entry without e's top bit,
      // plus v[top] (the same additions in the same order as summing bit by bit).
      float* t = lut + (m * C + c) * 16;
      const float* v = xm + 4 * c;
      t[0] = 0.f;
      for (int b = 0; b < 4; ++b)
        for (int e = 1 << b; e < 2 << b; ++e) t[e] = (e == (1 << b)) ? v[b] : t[e - (1 << b)] + v[b];
    }
  }
}

// The sums of x over each group (the offsets' factor).
void group_sums(const float* x, int64_t M, int64_t KP, int64_t group, float* gsum) {
  const int64_t G = KP / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * KP + k];
      gsum[m * G + g] = s;
    }
}

// One tile's results for row m of x: out[m, n0 .. n0 + nn) = r[0 .. nn) (+ bias), rounded to O.
// Whole tiles in vectors (a batch of 64 rows stores 64 N values a call: scalar bf16 rounding cost as much
// as a quarter of the product), the same rounding as the scalar tail.
template <typename O>
inline void store_tile_row(O* out, const float* r, int64_t m, int64_t N, int64_t n0, int nn, const float* bias) {
  O* o = out + m * N + n0;
  if (nn == kRows && kRows % kLanes == 0) {
    for (int j = 0; j < kRows; j += kLanes) vstore(o + j, vload(r + j) + (bias ? vload(bias + n0 + j) : vzero()));
    return;
  }
  for (int j = 0; j < nn; ++j) o[j] = from_float<O>(r[j] + (bias ? bias[n0 + j] : 0.f));
}

// Calls f(std::integral_constant<int, mm>{}) for a run-time mm in [1, MaxM], so kernels get their row count
// as a constant.
template <int MaxM, typename F>
inline void with_rows(int mm, const F& f) {
  if constexpr (MaxM > 1)
    if (mm < MaxM) return with_rows<MaxM - 1>(mm, f);
  f(std::integral_constant<int, MaxM>{});
}

// The tile loop of the kernels that make codes in registers (bitplane_dp.h, bitplane_i8.h): tiles of 16
// output columns split across threads; per tile, rows of x MaxM at a time share each pair's codes.
// tile(mb, res, tt, m0, t) fills res's mb rows for tile t (tt: its planes); they are then stored.
template <int MaxM, typename O, typename Tile>
void for_each_tile(O* out, int64_t T, int64_t M, int64_t KP, int bits, int64_t n, const uint8_t* tp,
                   const float* bias, const Tile& tile) {
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float res[MaxM][kRows];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tt = tp + t * (KP / 8) * bits * 16;
      const int nn = static_cast<int>(std::min<int64_t>(kRows, n - t * kRows));
      for (int64_t m0 = 0; m0 < M; m0 += MaxM) {
        const int mm = static_cast<int>(std::min<int64_t>(MaxM, M - m0));
        with_rows<MaxM>(mm, [&](auto mb) { tile(mb, res, tt, m0, t); });
        for (int m = 0; m < mm; ++m) store_tile_row(out, res[m], m0 + m, n, t * kRows, nn, bias);
      }
    }
  });
}

#if defined(__AVX512F__)
// 16 lanes, lane r = output row r; _mm512_permutexvar_ps(idx, table) picks table[idx_r & 15].
template <int MM, typename O>
void tile_product_m(O* out, const uint8_t* tp, const float* scale, const float* offset, const float* lut,
                    const float* gsum, const float* bias, int64_t m0, int64_t t, int64_t N, int64_t KP, int bits,
                    int64_t group) {
  const int64_t C = KP / 4, G = KP / group, pairs_per_group = group / 8;
  __m512 y[MM];
  for (int m = 0; m < MM; ++m) y[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // Two accumulators per row of x, even and odd planes, so that consecutive planes' fmas do not wait
    // on each other. Measured on the 2-core Xeon it changed little: the permutes and the byte widening,
    // all on one port, bound the loop (docs/benchmarks.md).
    __m512 acc[MM][2];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t p = g * pairs_per_group; p < (g + 1) * pairs_per_group; ++p) {
      // The pair's two tables for each row of x stay in registers across the planes.
      __m512 tlo[MM], thi[MM];
      for (int m = 0; m < MM; ++m) {
        const float* l = lut + ((m0 + m) * C + 2 * p) * 16;
        tlo[m] = _mm512_loadu_ps(l);
        thi[m] = _mm512_loadu_ps(l + 16);
      }
      for (int i = 0; i < bits; ++i) {
        const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tp + (p * bits + i) * 16)));
        const __m512i hi = _mm512_srli_epi32(lo, 4);
        const __m512 w = _mm512_set1_ps(static_cast<float>(1 << i));
        for (int m = 0; m < MM; ++m)
          acc[m][i & 1] = _mm512_fmadd_ps(
              _mm512_add_ps(_mm512_permutexvar_ps(lo, tlo[m]), _mm512_permutexvar_ps(hi, thi[m])), w, acc[m][i & 1]);
      }
    }
    const __m512 sc = _mm512_loadu_ps(scale + (t * G + g) * kRows);
    const __m512 of = _mm512_loadu_ps(offset + (t * G + g) * kRows);
    for (int m = 0; m < MM; ++m)
      y[m] = _mm512_fmadd_ps(sc, _mm512_add_ps(acc[m][0], acc[m][1]),
                             _mm512_fmadd_ps(of, _mm512_set1_ps(gsum[(m0 + m) * G + g]), y[m]));
  }
  const int64_t n0 = t * kRows;
  const int nn = static_cast<int>(std::min<int64_t>(kRows, N - n0));
  for (int m = 0; m < MM; ++m) {
    alignas(64) float r[kRows];
    _mm512_store_ps(r, y[m]);
    store_tile_row(out, r, m0 + m, N, n0, nn, bias);
  }
}

template <typename O>
void tile_product(O* out, const uint8_t* tiles, const float* scale, const float* offset, const float* lut,
                  const float* gsum, const float* bias, int64_t m0, int mm, int64_t t, int64_t N, int64_t KP,
                  int bits, int64_t group) {
  const uint8_t* tp = tiles + t * (KP / 8) * bits * 16;
  switch (mm) {  // a compile-time row count keeps the tables and accumulators in registers
    case 1:
      return tile_product_m<1>(out, tp, scale, offset, lut, gsum, bias, m0, t, N, KP, bits, group);
    case 2:
      return tile_product_m<2>(out, tp, scale, offset, lut, gsum, bias, m0, t, N, KP, bits, group);
    case 3:
      return tile_product_m<3>(out, tp, scale, offset, lut, gsum, bias, m0, t, N, KP, bits, group);
    default:
      return tile_product_m<4>(out, tp, scale, offset, lut, gsum, bias, m0, t, N, KP, bits, group);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// 8 lanes: a tile's 16 rows are two halves. vpermps has 8 entries, so a 16-entry table is two
// permutes and a blend on bit 3 of the index (moved into the sign bit).
inline __m256 lookup16(__m256i idx, __m256 t0, __m256 t1) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MM, typename O>
void tile_product_m(O* out, const uint8_t* tp, const float* scale, const float* offset, const float* lut,
                    const float* gsum, const float* bias, int64_t m0, int64_t t, int64_t N, int64_t KP, int bits,
                    int64_t group) {
  const int64_t C = KP / 4, G = KP / group, pairs_per_group = group / 8;
  __m256 y[MM][2];
  for (int m = 0; m < MM; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MM][2];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t p = g * pairs_per_group; p < (g + 1) * pairs_per_group; ++p) {
      for (int i = 0; i < bits; ++i) {
        const __m256 w = _mm256_set1_ps(static_cast<float>(1 << i));
        for (int h = 0; h < 2; ++h) {
          const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tp + (p * bits + i) * 16 + 8 * h)));
          const __m256i hi = _mm256_srli_epi32(lo, 4);
          for (int m = 0; m < MM; ++m) {
            const float* l = lut + ((m0 + m) * C + 2 * p) * 16;
            const __m256 a = lookup16(lo, _mm256_loadu_ps(l), _mm256_loadu_ps(l + 8));
            const __m256 b = lookup16(hi, _mm256_loadu_ps(l + 16), _mm256_loadu_ps(l + 24));
            acc[m][h] = _mm256_fmadd_ps(_mm256_add_ps(a, b), w, acc[m][h]);
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_loadu_ps(scale + (t * G + g) * kRows + 8 * h);
      const __m256 of = _mm256_loadu_ps(offset + (t * G + g) * kRows + 8 * h);
      for (int m = 0; m < MM; ++m)
        y[m][h] = _mm256_fmadd_ps(sc, acc[m][h], _mm256_fmadd_ps(of, _mm256_set1_ps(gsum[(m0 + m) * G + g]), y[m][h]));
    }
  }
  const int64_t n0 = t * kRows;
  const int nn = static_cast<int>(std::min<int64_t>(kRows, N - n0));
  for (int m = 0; m < MM; ++m) {
    alignas(32) float r[kRows];
    _mm256_store_ps(r, y[m][0]);
    _mm256_store_ps(r + 8, y[m][1]);
    store_tile_row(out, r, m0 + m, N, n0, nn, bias);
  }
}

template <typename O>
void tile_product(O* out, const uint8_t* tiles, const float* scale, const float* offset, const float* lut,
                  const float* gsum, const float* bias, int64_t m0, int mm, int64_t t, int64_t N, int64_t KP,
                  int bits, int64_t group) {
  const uint8_t* tp = tiles + t * (KP / 8) * bits * 16;
  for (int m = 0; m < mm; m += 2) {  // two rows of x at a time keep the accumulators in 16 registers
    if (mm - m >= 2)
      tile_product_m<2>(out, tp, scale, offset, lut, gsum, bias, m0 + m, t, N, KP, bits, group);
    else
      tile_product_m<1>(out, tp, scale, offset, lut, gsum, bias, m0 + m, t, N, KP, bits, group);
  }
}
#else
// Portable: the same sums in the same order, one lane at a time.
template <typename O>
void tile_product(O* out, const uint8_t* tiles, const float* scale, const float* offset, const float* lut,
                  const float* gsum, const float* bias, int64_t m0, int mm, int64_t t, int64_t N, int64_t KP,
                  int bits, int64_t group) {
  const int64_t C = KP / 4, G = KP / group, pairs_per_group = group / 8;
  const uint8_t* tp = tiles + t * (KP / 8) * bits * 16;
  const int64_t n0 = t * kRows;
  const int nn = static_cast<int>(std::min<int64_t>(kRows, N - n0));
  for (int m = 0; m < mm; ++m) {
    float y[kRows] = {};
    for (int64_t g = 0; g < G; ++g) {
      float acc[kRows] = {};
      for (int64_t p = g * pairs_per_group; p < (g + 1) * pairs_per_group; ++p)
        for (int i = 0; i < bits; ++i) {
          const uint8_t* b = tp + (p * bits + i) * 16;
          const float* l = lut + ((m0 + m) * C + 2 * p) * 16;
          for (int r = 0; r < kRows; ++r)
            acc[r] = __builtin_fmaf(l[b[r] & 15] + l[16 + (b[r] >> 4)], static_cast<float>(1 << i), acc[r]);
        }
      for (int r = 0; r < kRows; ++r) {
        const float sc = scale[(t * G + g) * kRows + r], of = offset[(t * G + g) * kRows + r];
        y[r] = __builtin_fmaf(sc, acc[r], __builtin_fmaf(of, gsum[(m0 + m) * G + g], y[r]));
      }
    }
    store_tile_row(out, y, m0 + m, N, n0, nn, bias);
  }
}
#endif

// W[row0 + r, k] for r in [0, rows), k in [0, K), written transposed: out[k * ld + r] (row0 a multiple
// of 16). In the tiles a vector of 16 bytes holds one plane of 16 rows at 8 consecutive weights, so
// with the rows in the lanes every weight's codes come out as one vector (a mask test and masked add
// per plane and weight): no per-row shuffling, and the GEMM takes the transposed block as it is.
// w = code * scale + offset in two fp32 roundings (torch's q * scale + offset; the module is built
// with -ffp-contract=off), then rounded to T.
template <typename T>
void dequantize_cols(T* out, int64_t ld, const uint8_t* tiles, const float* scale, const float* offset,
                     int64_t row0, int64_t rows, int64_t KP, int64_t K, int bits, int64_t group) {
  const int64_t G = KP / group, pairs = KP / 8, t0 = row0 / kRows, ntiles = (rows + kRows - 1) / kRows;
#if defined(TCPU_BITPLANE_DP)
  const dp::Consts dc = dp::consts(bits);
#endif
  at::parallel_for(0, ntiles, 1, [&](int64_t a, int64_t b) {
    for (int64_t tt = a; tt < b; ++tt) {
      const int64_t t = t0 + tt;
      const uint8_t* tp = tiles + t * pairs * bits * 16;
      const int nn = static_cast<int>(std::min<int64_t>(kRows, rows - tt * kRows));
      T* col = out + tt * kRows;
      for (int64_t p = 0; p < pairs && 8 * p < K; ++p) {
        const int64_t g = 8 * p / group;
        const float* sc = scale + (t * G + g) * kRows;
        const float* of = offset + (t * G + g) * kRows;
        const int n = static_cast<int>(std::min<int64_t>(8, K - 8 * p));
#if defined(TCPU_BITPLANE_DP)
        if (bits <= dp::kDpMaxBits) {  // codes by bit transpose (bitplane_dp.h): 2 ops instead of 17 a plane
          const __m512i codes = dp::pair_codes(dc, tp + p * bits * 16, bits);
          const __m512 vs = _mm512_loadu_ps(sc), vo = _mm512_loadu_ps(of);
          for (int j = 0; j < n; ++j) {
            const VF w = {_mm512_add_ps(_mm512_mul_ps(dp::weight_codes(codes, j), vs), vo)};
            T* dst = col + (8 * p + j) * ld;
            if (nn == kRows)
              vstore(dst, w);
            else
              vstore_n(dst, w, nn);
          }
          continue;
        }
#endif
#if defined(__AVX512F__)
        __m512i code[8];
        plane_codes_epi32(tp + p * bits * 16, bits, code);
        const __m512 vs = _mm512_loadu_ps(sc), vo = _mm512_loadu_ps(of);
        for (int j = 0; j < n; ++j) {
          const VF w = {_mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(code[j]), vs), vo)};
          T* dst = col + (8 * p + j) * ld;
          if (nn == kRows)  // vec.h's stores round as c10 does; a last partial tile goes through vstore_n
            vstore(dst, w);
          else
            vstore_n(dst, w, nn);
        }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        __m256i code[2][8];
        plane_codes_epi32(tp + p * bits * 16, bits, code);
        for (int h = 0; h < 2 && 8 * h < nn; ++h) {  // rows 8h .. 8h + 7 (scale and offset are padded to 16)
          const int rows = std::min(8, nn - 8 * h);
          const __m256 vs = _mm256_loadu_ps(sc + 8 * h), vo = _mm256_loadu_ps(of + 8 * h);
          for (int j = 0; j < n; ++j) {
            const VF w = {_mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(code[h][j]), vs), vo)};
            T* dst = col + (8 * p + j) * ld + 8 * h;
            if (rows == 8)
              vstore(dst, w);
            else
              vstore_n(dst, w, rows);
          }
        }
#else
        for (int r = 0; r < nn; ++r) {
          float code[8] = {};
          for (int i = 0; i < bits; ++i) {
            const uint8_t byte = tp[(p * bits + i) * 16 + r];
            for (int j = 0; j < 8; ++j) code[j] += static_cast<float>(((byte >> j) & 1) << i);
          }
          for (int j = 0; j < n; ++j) {
            const float prod = code[j] * sc[r];
            col[(8 * p + j) * ld + r] = from_float<T>(prod + of[r]);
          }
        }
#endif
      }
    }
  });
}

// f(p) with p out's data as float*, bf16* or f16*.
template <typename F>
void with_out_ptr(torch::Tensor& out, const char* fn, F&& f) {
  switch (out.scalar_type()) {
    case at::kFloat:
      return f(out.data_ptr<float>());
    case at::kBFloat16:
      return f(reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()));
    case at::kHalf:
      return f(reinterpret_cast<f16*>(out.data_ptr<at::Half>()));
    default:
      TORCH_CHECK(false, fn, "out must be float32, bfloat16 or float16");
  }
}

}  // namespace

void bitplane_linear(torch::Tensor out, torch::Tensor x, torch::Tensor tiles, torch::Tensor scale,
                     torch::Tensor offset, int64_t n, c10::optional<torch::Tensor> bias, int64_t act_bits) {
  const char* fn = "bitplane_linear: ";
  for (const auto* t : {&out, &x, &tiles, &scale, &offset})
    TORCH_CHECK(t->device().is_cpu(), fn, "CPU tensors only");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 4 && tiles.size(3) == kRows && tiles.is_contiguous(),
              fn, "tiles must be contiguous uint8 [N_pad / 16, K_pad / 8, bits, 16], got ", tiles.sizes());
  const int64_t T = tiles.size(0), KP = tiles.size(1) * 8;
  const int bits = static_cast<int>(tiles.size(2));
  TORCH_CHECK(bits >= 1 && bits <= 8, fn, "1 to 8 planes, got ", bits);
  TORCH_CHECK(n > 0 && n <= T * kRows && n > (T - 1) * kRows, fn, "n = ", n, " does not fit ", T, " tiles");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat && scale.dim() == 3 &&
                  scale.size(0) == T && scale.size(2) == kRows && offset.sizes() == scale.sizes() &&
                  scale.is_contiguous() && offset.is_contiguous(),
              fn, "scale and offset must be contiguous float32 [N_pad / 16, groups, 16]");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && KP % groups == 0 && (KP / groups) % 8 == 0, fn, "groups (", groups,
              ") must split K_pad (", KP, ") into multiples of 8");
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= KP, fn, "x must be [M, K] with K <= ", KP, ", got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), group = KP / groups;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == n && out.is_contiguous(), fn,
              "out must be a contiguous [", M, ", ", n, "] tensor");
  if (M == 0) return;
  // x in fp32, zero-padded to K_pad, and its tables, in buffers kept between calls: a single-stream
  // token makes some 120 of these calls, and allocating, zeroing and converting through torch ops
  // cost as much as a small layer's product.
  TORCH_CHECK(act_bits == 0 || act_bits == 8, fn, "act_bits must be 0 (exact) or 8, got ", act_bits);
  static thread_local std::vector<float> xf, lut, gsum;
  xf.resize(M * KP);
  const torch::Tensor xc = x.contiguous();
  const auto widen = [&](const auto* src) {
    for (int64_t m = 0; m < M; ++m) {
      float* d = xf.data() + m * KP;
      for (int64_t k = 0; k < K; ++k) d[k] = to_float(src[m * K + k]);
      std::fill(d + K, d + KP, 0.f);
    }
  };
  switch (xc.scalar_type()) {
    case at::kFloat:
      widen(xc.data_ptr<float>());
      break;
    case at::kBFloat16:
      widen(reinterpret_cast<const bf16*>(xc.data_ptr<at::BFloat16>()));
      break;
    case at::kHalf:
      widen(reinterpret_cast<const f16*>(xc.data_ptr<at::Half>()));
      break;
    default:
      TORCH_CHECK(false, fn, "x must be float32, bfloat16 or float16");
  }
  torch::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, fn, "bias must be [", n, "]");
    bf = bias->to(at::kFloat).contiguous();
  }
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>();
  if (act_bits == 8) {  // int8 activations and integer dot products (bitplane_i8.h)
    static thread_local std::vector<int8_t> qx;
    static thread_local std::vector<float> sx;
    static thread_local std::vector<float> sxq;
    qx.resize(M * KP);
    sx.resize(M * groups);
    sxq.resize(M * groups);
    // Plain pointers for the worker threads: inside a lambda the names would be each thread's own buffers.
    const float* xfp = xf.data();
    int8_t* qxp = qx.data();
    float* sxp = sx.data();
    float* sxqp = sxq.data();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      i8::quantize_x(xfp + m0 * KP, m1 - m0, KP, group, qxp + m0 * KP, sxp + m0 * groups, sxqp + m0 * groups);
    });
    const i8::Consts ic = i8::consts(bits, group / 8);
    const auto run_i8 = [&](auto* o) {
      for_each_tile<i8::kMaxM>(o, T, M, KP, bits, n, tp, bp,
                               [&](auto mb, float (*res)[kRows], const uint8_t* tt, int64_t m0, int64_t t) {
                                 i8::tile<decltype(mb)::value>(res, ic, tt, sp, op, qxp, sxp, sxqp, m0, t, KP, bits,
                                                               group);
                               });
    };
    return with_out_ptr(out, fn, run_i8);
  }
  // The exact kernels' buffers (int8 activations use neither: a prefill-sized call would grow the tables to
  // megabytes for nothing).
  lut.resize(M * (KP / 4) * 16);
  gsum.resize(M * groups);
  group_sums(xf.data(), M, KP, group, gsum.data());
#if defined(TCPU_BITPLANE_DP)
  // bf16 x and at most 4 planes: the codes-and-dot-products kernel (bitplane_dp.h) instead of the tables.
  static thread_local std::vector<uint64_t> xdp;
  const bool use_dp = xc.scalar_type() == at::kBFloat16 && bits >= dp_min_bits && bits <= dp::kDpMaxBits;
  const bool direct = use_dp && bits <= dp::kDirectMaxBits;
  if (use_dp) {
    xdp.resize(M * (KP / 8) * 2);
    const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    if (direct) {  // x as it is, zero-padded to K_pad (4 bf16 a qword)
      auto* d = reinterpret_cast<uint16_t*>(xdp.data());
      for (int64_t m = 0; m < M; ++m) {
        std::memcpy(d + m * KP, xb + m * K, K * sizeof(uint16_t));
        std::fill(d + m * KP + K, d + (m + 1) * KP, uint16_t{0});
      }
    } else {
      for (int64_t m = 0; m < M; ++m) dp::pack_x(xdp.data() + m * (KP / 8) * 2, xb + m * K, K, KP);
    }
  } else {
    build_tables(xf.data(), M, KP, lut.data());
  }
  const uint64_t* xdpp = xdp.data();
#else
  build_tables(xf.data(), M, KP, lut.data());
#endif
  // Plain pointers for the worker threads: inside the lambda the names would be each thread's own buffers.
  const float* lutp = lut.data();
  const float* gsump = gsum.data();
  const auto run = [&](auto* o) {
#if defined(TCPU_BITPLANE_DP)
    const auto dp_tiles = [&](const auto& tile) { for_each_tile<kMB>(o, T, M, KP, bits, n, tp, bp, tile); };
    if (direct) {
      const dp::DirectConsts c = dp::direct_consts(bits);
      const auto* xb = reinterpret_cast<const uint16_t*>(xdpp);
      dp_tiles([&](auto mb, float (*res)[kRows], const uint8_t* tt, int64_t m0, int64_t t) {
        dp::tile_direct<decltype(mb)::value>(res, c, tt, sp, op, xb, gsump, m0, t, KP, bits, group);
      });
      return;
    }
    if (use_dp) {
      const dp::Consts c = dp::consts(bits);
      dp_tiles([&](auto mb, float (*res)[kRows], const uint8_t* tt, int64_t m0, int64_t t) {
        dp::tile<decltype(mb)::value>(res, c, tt, sp, op, xdpp, gsump, m0, t, KP, bits, group);
      });
      return;
    }
#endif
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m0 = 0; m0 < M; m0 += kMB)
          tile_product(o, tp, sp, op, lutp, gsump, bp, m0, static_cast<int>(std::min<int64_t>(kMB, M - m0)), t, n, KP, bits, group);
    });
  };
  with_out_ptr(out, fn, run);
}

void bitplane_dequantize_t(torch::Tensor out, torch::Tensor tiles, torch::Tensor scale, torch::Tensor offset,
                           int64_t row0) {
  const char* fn = "bitplane_dequantize_t: ";
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 4 && tiles.size(3) == kRows && tiles.is_contiguous(),
              fn, "tiles must be contiguous uint8 [N_pad / 16, K_pad / 8, bits, 16]");
  const int64_t T = tiles.size(0), KP = tiles.size(1) * 8;
  const int bits = static_cast<int>(tiles.size(2));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.size(0) == T && scale.is_contiguous() &&
                  offset.sizes() == scale.sizes() && offset.scalar_type() == at::kFloat && offset.is_contiguous(),
              fn, "scale and offset must be contiguous float32 [N_pad / 16, groups, 16]");
  const int64_t group = KP / scale.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) <= KP && out.stride(1) == 1 && out.stride(0) >= out.size(1), fn,
              "out must be [K, rows] with unit column stride, got sizes ", out.sizes(), " strides ", out.strides());
  const int64_t K = out.size(0), rows = out.size(1);
  TORCH_CHECK(row0 >= 0 && row0 % kRows == 0 && row0 + rows <= T * kRows, fn, "rows [", row0, ", ", row0 + rows,
              ") must start on a tile (16 rows) and lie inside the tiles");
  const auto* tp = tiles.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>();
  const int64_t ld = out.stride(0);
  switch (out.scalar_type()) {
    case at::kFloat:
      return dequantize_cols(out.data_ptr<float>(), ld, tp, sp, op, row0, rows, KP, K, bits, group);
    case at::kBFloat16:
      return dequantize_cols(reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()), ld, tp, sp, op, row0, rows, KP,
                             K, bits, group);
    case at::kHalf:
      return dequantize_cols(reinterpret_cast<f16*>(out.data_ptr<at::Half>()), ld, tp, sp, op, row0, rows, KP, K,
                             bits, group);
    default:
      TORCH_CHECK(false, fn, "out must be float32, bfloat16 or float16");
  }
}

}  // namespace tcpu
