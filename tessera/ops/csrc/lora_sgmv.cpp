// LoRA's products for all of a step's segments in one call (S-LoRA/Punica's SGMV on a CPU).
//
// y[a:b] += (x[a:b] @ A[s]) @ B[s] for every segment (a, b, s): rows a..b of the flat batch run with the
// adapter in slot s. The runner orders the rows so that an adapter's rows are contiguous, so a segment
// is a plain row range: no gathers, no padding. A decode step of 8 adapters is 8 segments of a few rows
// each; as ATen GEMMs that is two small GEMMs per segment and linear (~10-30 us of fixed cost each on
// a CPU, whatever their size: ~2,000 calls a step on the 30-layer default model), here it is one call
// per linear, parallel over blocks of kRows rows.
//
// A [S, in, R] holds the slices' A^T side by side (R = slices * rank); B [S, R, out] is block-diagonal
// (tessera/lora/manager.py): slice j's rank rows feed only its output columns, so the expand of a
// fused q/k/v or gate/up layer reads only its diagonal blocks (a third or half of B). Products
// accumulate in fp32: h = x A stays fp32 between the shrink and the expand, and each output element is
// rounded once, y = round(y + sum). Each row block's arithmetic is fixed (its own rows, a fixed order
// over k), so the result does not depend on how the blocks are shared among threads.
//
// Long segments (prefill chunks) go to ATen's GEMMs instead, where a GEMM's fixed cost is small
// against its work and the BLAS's blocking beats this kernel's.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "vec.h"

namespace tcpu {

namespace {

constexpr int kRows = 4;      // rows per block: a block's accumulators are kRows x NV vectors
constexpr int kMaxVecs = 4;   // columns per pass: up to kMaxVecs vectors

// acc[r][v] = sum_k xr[r][k] * w[k * ldw + c + v * kLanes], for k < K. xr: kRows fp32 rows (a block
// shorter than kRows repeats its last row; the caller stores only the real ones). `tail`: lanes of the
// last vector (kLanes: a full one).
template <int NV, typename W>
inline void axpy_block(VF acc[kRows][kMaxVecs], const float* const xr[kRows], int64_t K, const W* w, int64_t ldw,
                       int tail) {
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    VF wv[NV];
    for (int v = 0; v < NV; ++v) {
      const W* p = w + k * ldw + v * kLanes;
      wv[v] = (v == NV - 1 && tail < kLanes) ? vload_n(p, tail) : vload(p);
    }
    for (int r = 0; r < kRows; ++r) {
      const VF xb = vset1(xr[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = fma(xb, wv[v], acc[r][v]);
    }
  }
}

// Calls body(NV, c, tail) for each pass over the columns [0, n): passes of kMaxVecs vectors, then one
// of the vectors that remain (the last possibly partial).
template <typename Body>
inline void column_passes(int64_t n, const Body& body) {
  int64_t c = 0;
  for (; c + kMaxVecs * kLanes <= n; c += kMaxVecs * kLanes) body(kMaxVecs, c, kLanes);
  if (c < n) {
    const int64_t rest = n - c;
    const int nv = static_cast<int>((rest + kLanes - 1) / kLanes);
    body(nv, c, static_cast<int>(rest - (nv - 1) * kLanes));
  }
}

template <typename W>
inline void axpy_dispatch(int nv, VF acc[kRows][kMaxVecs], const float* const xr[kRows], int64_t K, const W* w,
                          int64_t ldw, int tail) {
  switch (nv) {
    case 1: axpy_block<1>(acc, xr, K, w, ldw, tail); break;
    case 2: axpy_block<2>(acc, xr, K, w, ldw, tail); break;
    case 3: axpy_block<3>(acc, xr, K, w, ldw, tail); break;
    default: axpy_block<4>(acc, xr, K, w, ldw, tail); break;
  }
}

// One block of rows [r0, r0 + rows) of one segment (rows <= kRows), slot s.
template <typename T>
void block(T* y, int64_t ldy, const T* x, int64_t ldx, const T* A, const T* B, int64_t K, int64_t R, int64_t N,
           const std::vector<std::pair<int64_t, int64_t>>& slices, int64_t r0, int rows, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(kRows * (K + R)));
  float* xf = buf.data();
  float* h = xf + kRows * K;
  const float* xr[kRows];
  for (int r = 0; r < kRows; ++r) {
    const int rr = std::min(r, rows - 1);
    if (r == rr) {
      const T* src = x + (r0 + r) * ldx;
      for (int64_t k = 0; k < K; ++k) xf[r * K + k] = to_float(src[k]);
    }
    xr[r] = xf + rr * K;
  }
  VF acc[kRows][kMaxVecs];
  // Shrink: h[r, :] = x[r, :] @ A, all slices at once (A's columns are the slices' ranks side by side).
  column_passes(R, [&](int nv, int64_t c, int tail) {
    axpy_dispatch(nv, acc, xr, K, A + c, R, tail);
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < nv; ++v) {
        const int n = v == nv - 1 ? tail : kLanes;
        float* dst = h + r * R + c + v * kLanes;
        if (n == kLanes) vstore(dst, acc[r][v]); else vstore_n(dst, acc[r][v], n);
      }
  });
  const float* hr[kRows];
  for (int r = 0; r < kRows; ++r) hr[r] = h + r * R;
  // Expand, slice by slice: y[r, o0:o1] += h[r, j*rank:(j+1)*rank] @ B[j*rank:(j+1)*rank, o0:o1].
  const int64_t nslices = static_cast<int64_t>(slices.size());
  const int64_t rank = R / nslices;
  for (int64_t j = 0; j < nslices; ++j) {
    const auto [o0, o1] = slices[j];
    const float* hj[kRows];
    for (int r = 0; r < kRows; ++r) hj[r] = hr[r] + j * rank;
    column_passes(o1 - o0, [&](int nv, int64_t c, int tail) {
      axpy_dispatch(nv, acc, hj, rank, B + j * rank * N + o0 + c, N, tail);
      for (int r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) {
          const int n = v == nv - 1 ? tail : kLanes;
          T* dst = y + (r0 + r) * ldy + o0 + c + v * kLanes;
          if (n == kLanes) {
            vstore(dst, vload(dst) + acc[r][v]);
          } else {
            vstore_n(dst, vload_n(dst, n) + acc[r][v], n);
          }
        }
    });
  }
}

template <typename T>
void sgmv(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
          const std::vector<std::tuple<int64_t, int64_t, int64_t>>& segs,
          const std::vector<std::pair<int64_t, int64_t>>& slices) {
  const int64_t K = x.size(1), R = A.size(2), N = B.size(2);
  std::vector<std::tuple<int64_t, int, int64_t>> blocks;  // (first row, rows, slot)
  for (const auto& [a, b, s] : segs)
    for (int64_t r = a; r < b; r += kRows) blocks.emplace_back(r, static_cast<int>(std::min<int64_t>(kRows, b - r)), s);
  T* yp = y.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* ap = A.data_ptr<T>();
  const T* bp = B.data_ptr<T>();
  const int64_t ldy = y.stride(0), ldx = x.stride(0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) {
      const auto [r0, rows, s] = blocks[i];
      block<T>(yp, ldy, xp, ldx, ap + s * K * R, bp + s * R * N, K, R, N, slices, r0, rows, buf);
    }
  });
}

}  // namespace

void lora_sgmv(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b,
               const std::vector<std::tuple<int64_t, int64_t, int64_t>>& segments,
               std::vector<std::pair<int64_t, int64_t>> slices, int64_t gemm_from_rows) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3, "lora_sgmv: bad ranks");
  TORCH_CHECK(x.size(0) == y.size(0) && lora_a.size(1) == x.size(1) && lora_b.size(1) == lora_a.size(2) &&
                  lora_b.size(2) == y.size(1) && lora_a.size(0) == lora_b.size(0),
              "lora_sgmv: shapes do not fit: x ", x.sizes(), " y ", y.sizes(), " A ", lora_a.sizes(), " B ",
              lora_b.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && lora_a.scalar_type() == x.scalar_type() &&
                  lora_b.scalar_type() == x.scalar_type(),
              "lora_sgmv: x, y and the slots must have one dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && lora_a.is_contiguous() && lora_b.is_contiguous(),
              "lora_sgmv: rows of x and y, and the slots, must be contiguous");
  if (slices.empty()) slices.emplace_back(0, y.size(1));
  TORCH_CHECK(lora_a.size(2) % static_cast<int64_t>(slices.size()) == 0, "lora_sgmv: R is not slices x rank");
  for (const auto& [a, b, s] : segments)
    TORCH_CHECK(0 <= a && a <= b && b <= x.size(0) && 0 <= s && s < lora_a.size(0), "lora_sgmv: bad segment (",
                a, ", ", b, ", ", s, ")");
  std::vector<std::tuple<int64_t, int64_t, int64_t>> small;
  for (const auto& seg : segments) {
    const auto [a, b, s] = seg;
    if (b - a < gemm_from_rows) {
      small.push_back(seg);
      continue;
    }
    // A long segment: two GEMMs whose fixed cost is nothing against their work.
    auto h = torch::mm(x.slice(0, a, b), lora_a[s]);
    y.slice(0, a, b).add_(torch::mm(h, lora_b[s]));
  }
  if (small.empty()) return;
  switch (x.scalar_type()) {
    case at::kFloat: sgmv<float>(y, x, lora_a, lora_b, small, slices); break;
    case at::kBFloat16: sgmv<bf16>(y, x, lora_a, lora_b, small, slices); break;
    case at::kHalf: sgmv<f16>(y, x, lora_a, lora_b, small, slices); break;
    default: TORCH_CHECK(false, "lora_sgmv: dtype ", x.scalar_type(), " is not supported");
  }
}

}  // namespace tcpu
