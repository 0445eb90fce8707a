// Declarations of tessera's CPU kernels (defined in paged_attention.cpp, elementwise.cpp,
// bitplane_linear.cpp, bitplane_gemm.cpp, lora_sgmv.cpp and sampling.cpp), for the Python module (module.cpp) and the decode stack (decode_stack.cpp).
// All ops write into tensors the caller allocated.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <utility>
#include <vector>

namespace tcpu {
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
void silu_and_mul(torch::Tensor out, torch::Tensor x);
void rotary_embedding(torch::Tensor qk, torch::Tensor positions, torch::Tensor cos_sin, int64_t rotary_dim);
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor slot_mapping);
void bitplane_linear(torch::Tensor out, torch::Tensor x, torch::Tensor tiles, torch::Tensor scale,
                     torch::Tensor offset, int64_t n, c10::optional<torch::Tensor> bias, int64_t act_bits = 0);
void bitplane_dequantize_t(torch::Tensor out, torch::Tensor tiles, torch::Tensor scale, torch::Tensor offset,
                           int64_t row0);
void bitplane_gemm(torch::Tensor out, torch::Tensor x, torch::Tensor tiles, torch::Tensor scale, torch::Tensor offset,
                   int64_t n, c10::optional<torch::Tensor> bias, int64_t block_weights);
bool bitplane_gemm_uses_brgemm();
int64_t set_bitplane_dp_min_bits(int64_t bits);
void set_sum_lanes(int64_t lanes);
int64_t get_sum_lanes();
void lora_sgmv(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b,
               const std::vector<std::tuple<int64_t, int64_t, int64_t>>& segments,
               std::vector<std::pair<int64_t, int64_t>> slices, int64_t gemm_from_rows);
void sample_rows(torch::Tensor out, torch::Tensor logits, torch::Tensor temps, torch::Tensor uniform);
void register_decode_stack(pybind11::module_& m);
}  // namespace tcpu
