// One token per row drawn from softmax(logits / temperature) by inverse CDF, for rows that have no
// top-k / top-p / min-p filter (tessera/engine/sampler.py). The torch path it replaces makes five passes
// over [rows, vocab] fp32 (divide, max, subtract, exp, cumsum) and a searchsorted; the cumsum alone is a
// sequential double-precision chain per row, ~70 us for a 49K vocabulary, ~5 ms of a 64-row decode step
// on a 2-core CPU. Here each row is one task: the scaled logits and their weights stay in a per-thread
// buffer that fits in L2, and the cumulative sum is only walked up to the drawn token.
//
// Same numbers as the torch path: s = l / t and w = exp(s - max s) in fp32 (exp is Sleef's expf_u10, as
// torch's vectorised exp), the cumulative weights summed in double and rounded to float (torch's CPU
// cumsum accumulates in double), target = u * total in fp32, and the first index whose cumulative weight
// exceeds the target (searchsorted, right=True), clamped to the last; a token of weight 0 is never
// returned (the row's first largest weight instead). The totals here add blocks of 64 weights, torch's
// one weight at a time: both are double sums of floats rounded to float, which differ only when a double
// rounding lands on a float rounding boundary (~1e-9 per element); the token is found by a sequential
// walk inside its block.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace tcpu {
namespace {

constexpr int64_t kBlock = 64;  // weights per block of the cumulative sum

// Sum of w[0, n) in double, eight lanes (the compiler vectorises the independent lanes).
double block_sum(const float* w, int64_t n) {
  double lanes[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int e = 0; e < 8; ++e) lanes[e] += static_cast<double>(w[k + e]);
  double s = 0;
  for (; k < n; ++k) s += static_cast<double>(w[k]);
  for (double lane : lanes) s += lane;
  return s;
}

// The token of one row: `w` (vocab floats) and `blocks` (vocab / kBlock + 1 doubles) are scratch.
int64_t sample_row(const float* logits, int64_t V, float t, float u, float* w, double* blocks) {
  const VF vt = vset1(t);
  float m = -std::numeric_limits<float>::infinity();
  VF vm = vset1(m);
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    const VF s = vload(logits + j) / vt;
    vstore(w + j, s);
    vm = vmax(vm, s);
  }
  m = std::max(m, reduce_max(vm));
  for (; j < V; ++j) {
    w[j] = logits[j] / t;
    m = std::max(m, w[j]);
  }
  const VF vmx = vset1(m);
  for (j = 0; j + kLanes <= V; j += kLanes) vstore(w + j, vexp(vload(w + j) - vmx));
  if (j < V) vstore_n(w + j, vexp(vload_n(w + j, static_cast<int>(V - j)) - vmx), static_cast<int>(V - j));
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  double total = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    blocks[b] = block_sum(w + b * kBlock, std::min(kBlock, V - b * kBlock));
    total += blocks[b];
  }
  const float target = u * static_cast<float>(total);
  int64_t picked = V - 1;  // searchsorted's V, clamped
  double acc = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    if (static_cast<float>(acc + blocks[b]) <= target) {
      acc += blocks[b];
      continue;
    }
    // The crossing is in this block (or, by a rounding of the block sums, just after it: walk on).
    int64_t k = b * kBlock;
    for (; k < V; ++k) {
      acc += static_cast<double>(w[k]);
      if (static_cast<float>(acc) > target) break;
    }
    picked = std::min(k, V - 1);
    break;
  }
  if (w[picked] > 0.f) return picked;
  return std::max_element(w, w + V) - w;  // the first of the largest weights, as argmax
}

}  // namespace

void sample_rows(torch::Tensor out, torch::Tensor logits, torch::Tensor temps, torch::Tensor uniform) {
  const char* fn = "sample_rows: ";
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1, fn,
              "logits must be float32 [rows, vocab] with unit column stride");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, fn, "empty vocabulary");
  for (const auto& [t, name] : {std::pair{temps, "temps"}, std::pair{uniform, "uniform"}})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == R, fn, name,
                " must be contiguous float32 [rows]");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() && out.numel() == R, fn,
              "out must be contiguous int64 [rows]");
  const float* lp = logits.data_ptr<float>();
  const float *tp = temps.data_ptr<float>(), *up = uniform.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t ld = logits.stride(0);
  at::parallel_for(0, R, 1, [&](int64_t a, int64_t b) {
    std::vector<float> w(V);
    std::vector<double> blocks(V / kBlock + 1);
    for (int64_t r = a; r < b; ++r) op[r] = sample_row(lp + r * ld, V, tp[r], up[r], w.data(), blocks.data());
  });
}

}  // namespace tcpu
