// Paged decode attention for CPUs: each (sequence, KV head) pair reads its K and V once, straight from
// the blocks of its block table (no gather, no padding), and serves every query head of its group.
// Built at first use by torch.utils.cpp_extension; tessera falls back to torch ops if it cannot be.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <int D>
void decode_kernel(float* out, const float* q, const float* k_cache, const float* v_cache,
                   const int64_t* block_tables, const int64_t* seq_lens, int64_t num_seqs,
                   int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t max_blocks,
                   int64_t head_dim_rt, float scale) {
  const int64_t d_len = D > 0 ? D : head_dim_rt;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * d_len;  // between tokens of one block
  const int64_t block_stride = block_size * token_stride;
  // parallel_for hands each thread one contiguous range. Batches are often ordered by context length
  // (older sequences are longer), so the ranges are interleaved: thread t takes items t, t + T, ...
  const int64_t total = num_seqs * num_kv_heads;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  const int64_t chunk = (total + threads - 1) / threads;
  at::parallel_for(0, chunk * threads, chunk, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t work = (i % chunk) * threads + i / chunk;
      if (work >= total) continue;
      const int64_t s = work / num_kv_heads, h = work % num_kv_heads;
      const int64_t len = seq_lens[s];
      const int64_t* table = block_tables + s * max_blocks;
      const float* qs = q + (s * num_heads + h * group) * d_len;
      scores.assign(group * len, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float* kp = k_cache + table[t / block_size] * block_stride + (t % block_size) * token_stride + h * d_len;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qs + g * d_len;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < d_len; ++d) dot += qg[d] * kp[d];
          scores[g * len + t] = dot * scale;
        }
      }
      acc.assign(group * d_len, 0.f);
      std::vector<float> inv_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = std::exp(sg[t] - mx);
          sum += sg[t];
        }
        inv_sum[g] = 1.f / sum;
      }
      for (int64_t t = 0; t < len; ++t) {
        const float* vp = v_cache + table[t / block_size] * block_stride + (t % block_size) * token_stride + h * d_len;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + t];
          float* ag = acc.data() + g * d_len;
#pragma omp simd
          for (int64_t d = 0; d < d_len; ++d) ag[d] += w * vp[d];
        }
      }
      float* os = out + (s * num_heads + h * group) * d_len;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < d_len; ++d) os[g * d_len + d] = acc[g * d_len + d] * inv_sum[g];
    }
  });
}

}  // namespace

// out, q: [S, Hq, D] fp32 contiguous; k_cache, v_cache: [num_blocks, block_size, Hkv, D] fp32 contiguous;
// block_tables: [S, max_blocks] int64; seq_lens: [S] int64 (context length, the new token included).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_cache.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong);
  const int64_t head_dim = q.size(2);
  auto run = [&](auto d_tag) {
    constexpr int D = decltype(d_tag)::value;
    decode_kernel<D>(out.data_ptr<float>(), q.data_ptr<float>(), k_cache.data_ptr<float>(),
                     v_cache.data_ptr<float>(), block_tables.contiguous().data_ptr<int64_t>(),
                     seq_lens.contiguous().data_ptr<int64_t>(), q.size(0), q.size(1), k_cache.size(2),
                     k_cache.size(1), block_tables.size(1), head_dim, static_cast<float>(scale));
  };
  // Fixed head sizes get a compile-time trip count (fully vectorised loops).
  if (head_dim == 64) run(std::integral_constant<int, 64>{});
  else if (head_dim == 128) run(std::integral_constant<int, 128>{});
  else run(std::integral_constant<int, 0>{});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, fp32)");
}
