// Batched products on bit-plane weights (rows of x >= BitsLinearMethod.gemm_from_rows): out[M, n] = x @ W^T
// (+ bias), W[r, k] = scale * q + offset per group, with the planes read in place.
//
// Where torch's batch-reduce GEMM runs AMX (cpublas::could_pack(bf16): oneDNN's brgemm ukernel) and x is
// bf16, this is what torch's own weight-only-quantized CPU GEMM does (_weight_int4pack_mm_for_cpu, and
// inductor's WOQ micro-GEMM): for each block of 32 or 64 weight rows (see blocking()), the codes are rebuilt
// in registers (bitplane_dp.h: vpermb + gf2p8affineqb for up to 4 planes), scaled, rounded to bf16 and
// written in the VNNI layout ([K / 2][block][2], the pairs of k side by side) into a per-thread buffer that
// stays in L2 (K_pad * block * 2 bytes: 192 KiB at K = 1536 and 64 rows), and cpublas::brgemm multiplies
// every block of up to 64 rows of x by it. No dense copy of the matrix exists at any time, and the block is dequantized once per
// call however many rows x has.
//
// Elsewhere (fp32 or fp16 x, no AMX, K not a multiple of 64, no bitplane_dp.h): the earlier path, blocks of
// block_weights weights dequantized by bitplane_dequantize_t into a [K, rows] buffer and multiplied by
// at::linear.
//
// Numerics of the brgemm path: the GEMM multiplies exactly round_bf16(scale * q + offset) (the fp32 mul and
// add of torch's dequantize, then round to nearest even, as the blockwise path's bf16 buffer holds), by the
// bf16 x, with fp32 sums (AMX's bf16 dot products are exact products summed in fp32). So it equals
// dequantize-then-bf16-then-matmul within fp32 summation error.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "bitplane_codes.h"
#include "bitplane_dp.h"
#include "kernels.h"
#include "vec.h"

namespace tcpu {
namespace {

constexpr int kRows = 16;           // output rows per tile of the planes
constexpr int kMaxBlockN = 64;      // weight rows dequantized at a time (up to four tiles): one brgemm's N
constexpr int64_t kMaxBlockM = 64;  // rows of x per brgemm call (a decode batch of 64 in one call)

#if defined(TCPU_BITPLANE_DP)
// Weight rows per block and rows of x per brgemm call. 64 x 64 blocks make a quarter of the brgemm calls of
// 32 x 32 at a batch of 64 (each call looks its kernel up and configures the tiles); 32-row weight blocks
// where 64 would load the threads unevenly (576 rows: 9 blocks of 64 for two threads, against 18 of 32).
// TESSERA_BITS_BLOCK_N / TESSERA_BITS_BLOCK_M (multiples of 16 up to 64) override, to measure the choice.
struct Blocking {
  int tiles_per_block;
  int64_t block_m;
};

Blocking blocking(int64_t T) {
  auto env = [](const char* name) {
    const char* v = std::getenv(name);
    const int x = v ? std::atoi(v) : 0;
    return (x >= 16 && x <= 64 && x % 16 == 0) ? x : 0;
  };
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t blocks64 = (T + 3) / 4;
  int tiles = (blocks64 % threads == 0 || blocks64 >= 8 * threads) ? 4 : 2;
  if (const int n = env("TESSERA_BITS_BLOCK_N")) tiles = n / kRows;
  const int m = env("TESSERA_BITS_BLOCK_M");
  return {tiles, m ? m : kMaxBlockM};
}
#endif

// The blockwise path (see the header comment): blocks of weight rows dequantized into a [K, rows] buffer.
void blockwise_linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& tiles,
                      const torch::Tensor& scale, const torch::Tensor& offset, int64_t n,
                      const c10::optional<torch::Tensor>& bias, int64_t block_weights) {
  const int64_t k = x.size(1);
  const int64_t block = std::max<int64_t>(16, block_weights / k / 16 * 16);
  auto buf = x.new_empty({k, std::min(block, n)});
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t r1 = std::min(n, r0 + block);
    auto wt = buf.slice(1, 0, r1 - r0);
    bitplane_dequantize_t(wt, tiles, scale, offset, r0);
    c10::optional<torch::Tensor> b;
    if (bias.has_value() && bias->defined()) b = bias->slice(0, r0, r1);
    out.slice(1, r0, r1).copy_(at::linear(x, wt.t(), b));
  }
}

#if defined(TCPU_BITPLANE_DP)
// Tiles [t0, t0 + ntiles) of the weight (ntiles <= ldb / 16), dequantized to bf16 in the VNNI layout:
// bv[kp * ldb + r] = bf16 W[16 t0 + r, 2 kp] | bf16 W[16 t0 + r, 2 kp + 1] << 16. Rows past the tiles are
// left as they are (the GEMM's columns for them are not stored).
void dequantize_vnni(uint32_t* bv, int64_t ldb, const dp::Consts& dc, const uint8_t* tiles, const float* scale,
                     const float* offset, int64_t t0, int ntiles, int64_t KP, int bits, int64_t group) {
  const int64_t G = KP / group, pairs = KP / 8;
  // After cvtne2ps (words 0-15: the even k's 16 rows, 16-31: the odd k's), word 2r <- r, 2r + 1 <- 16 + r.
  alignas(64) uint16_t il[32];
  for (int r = 0; r < 16; ++r) {
    il[2 * r] = static_cast<uint16_t>(r);
    il[2 * r + 1] = static_cast<uint16_t>(16 + r);
  }
  const __m512i interleave = _mm512_load_si512(il);
  for (int tt = 0; tt < ntiles; ++tt) {
    const int64_t t = t0 + tt;
    const uint8_t* tp = tiles + t * pairs * bits * 16;
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t g = 8 * p / group;
      const __m512 vs = _mm512_loadu_ps(scale + (t * G + g) * kRows);
      const __m512 vo = _mm512_loadu_ps(offset + (t * G + g) * kRows);
      __m512 w[8];
      if (bits <= dp::kDpMaxBits) {
        const __m512i codes = dp::pair_codes(dc, tp + p * bits * 16, bits);
        for (int j = 0; j < 8; ++j) w[j] = dp::weight_codes(codes, j);
      } else {  // 5-8 planes: a mask test and masked add per plane and weight
        __m512i code[8];
        plane_codes_epi32(tp + p * bits * 16, bits, code);
        for (int j = 0; j < 8; ++j) w[j] = _mm512_cvtepi32_ps(code[j]);
      }
      for (int u = 0; u < 4; ++u) {
        // scale * q + offset in two roundings (the module is built with -ffp-contract=off), as torch's
        // dequantize; then round to nearest even (the weights are finite and far from denormal).
        const __m512 even = _mm512_add_ps(_mm512_mul_ps(w[2 * u], vs), vo);
        const __m512 odd = _mm512_add_ps(_mm512_mul_ps(w[2 * u + 1], vs), vo);
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
        _mm512_store_si512(bv + (4 * p + u) * ldb + tt * kRows, _mm512_permutexvar_epi16(interleave, both));
      }
    }
  }
}

template <typename O>
void brgemm_linear(O* out, const at::BFloat16* x, const uint8_t* tiles, const float* scale, const float* offset,
                   const float* bias, int64_t M, int64_t n, int64_t KP, int bits, int64_t group) {
  const int64_t T = (n + kRows - 1) / kRows;
  const Blocking bk = blocking(T);
  const int64_t tiles_per_block = bk.tiles_per_block, ldb = tiles_per_block * kRows, block_m = bk.block_m;
  const int64_t blocks = (T + tiles_per_block - 1) / tiles_per_block;
  const dp::Consts dc = dp::consts(std::min(bits, dp::kDpMaxBits));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // Per thread: the block's weights (L2, kept between calls) and one brgemm's fp32 result.
    static thread_local std::vector<uint32_t> bvv;
    bvv.resize(KP / 2 * ldb + 16);
    uint32_t* bv = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(bvv.data()) + 63) & ~uintptr_t{63});
    alignas(64) float c[kMaxBlockM * kMaxBlockN];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * tiles_per_block;
      const int ntiles = static_cast<int>(std::min<int64_t>(tiles_per_block, T - t0));
      dequantize_vnni(bv, ldb, dc, tiles, scale, offset, t0, ntiles, KP, bits, group);
      const int64_t n0 = t0 * kRows, nn = std::min<int64_t>(ntiles * kRows, n - n0);
      for (int64_t m0 = 0; m0 < M; m0 += block_m) {
        const int64_t mm = std::min(block_m, M - m0);
        at::native::cpublas::brgemm(mm, ntiles * kRows, KP, KP, ldb, ldb, false, x + m0 * KP,
                                    reinterpret_cast<const at::BFloat16*>(bv), c);
        for (int64_t m = 0; m < mm; ++m)
          for (int64_t j = 0; j < nn; j += kLanes) {
            VF v = vload(c + m * ldb + j);
            if (bias) v = v + (nn - j >= kLanes ? vload(bias + n0 + j) : vload_n(bias + n0 + j, static_cast<int>(nn - j)));
            O* dst = out + (m0 + m) * n + n0 + j;
            if (nn - j >= kLanes)
              vstore(dst, v);
            else
              vstore_n(dst, v, static_cast<int>(nn - j));
          }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}
#endif

}  // namespace

bool bitplane_gemm_uses_brgemm() {
#if defined(TCPU_BITPLANE_DP)
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
#else
  return false;
#endif
}

void bitplane_gemm(torch::Tensor out, torch::Tensor x, torch::Tensor tiles, torch::Tensor scale, torch::Tensor offset,
                   int64_t n, c10::optional<torch::Tensor> bias, int64_t block_weights) {
  const char* fn = "bitplane_gemm: ";
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n && out.is_contiguous(),
              fn, "x must be [M, K] and out a contiguous [M, n]");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 4 && tiles.size(3) == kRows && tiles.is_contiguous(),
              fn, "tiles must be contiguous uint8 [N_pad / 16, K_pad / 8, bits, 16], got ", tiles.sizes());
  const int64_t M = x.size(0), K = x.size(1), KP = tiles.size(1) * 8;
  const int bits = static_cast<int>(tiles.size(2));
  TORCH_CHECK(n > 0 && n <= tiles.size(0) * kRows && n > (tiles.size(0) - 1) * kRows, fn, "n = ", n,
              " does not fit ", tiles.size(0), " tiles");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.size(0) == tiles.size(0) &&
                  scale.size(2) == kRows && scale.is_contiguous() && offset.sizes() == scale.sizes() &&
                  offset.scalar_type() == at::kFloat && offset.is_contiguous(),
              fn, "scale and offset must be contiguous float32 [N_pad / 16, groups, 16]");
  TORCH_CHECK(K <= KP, fn, "x has ", K, " columns, the weight ", KP);
  if (M == 0) return;
#if defined(TCPU_BITPLANE_DP)
  if (x.scalar_type() == at::kBFloat16 && K == KP && bitplane_gemm_uses_brgemm()) {
    const auto xc = x.contiguous();
    torch::Tensor bf;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, fn, "bias must be [", n, "]");
      bf = bias->to(at::kFloat).contiguous();
    }
    const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
    const auto* xp = xc.data_ptr<at::BFloat16>();
    const auto* tp = tiles.data_ptr<uint8_t>();
    const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>();
    const int64_t group = KP / scale.size(1);
    switch (out.scalar_type()) {
      case at::kFloat:
        return brgemm_linear(out.data_ptr<float>(), xp, tp, sp, op, bp, M, n, KP, bits, group);
      case at::kBFloat16:
        return brgemm_linear(reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()), xp, tp, sp, op, bp, M, n, KP,
                             bits, group);
      default:
        break;  // fp16 out: the blockwise path
    }
  }
#endif
  blockwise_linear(out, x, tiles, scale, offset, n, bias, block_weights);
}

}  // namespace tcpu
