// The Python module: tessera's CPU kernels (paged_attention.cpp, elementwise.cpp, bitplane_linear.cpp,
// lora_sgmv.cpp, sampling.cpp, decode_stack.cpp), built once per CPU and cached by tessera/ops/cpu_kernels.py. All ops write into
// tensors the caller allocated.
#include <torch/extension.h>

#include "bitplane_dp.h"
#include "kernels.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.def("paged_decode_attention", &tcpu::paged_decode_attention,
        "Decode attention over a paged KV cache. out, q: [S, Hq, D]; k_cache, v_cache: [num_blocks, block_size, "
        "Hkv, D], all one dtype (float32/bfloat16/float16), contiguous; block_tables: int64 [S, max_blocks]; "
        "seq_lens: int64 [S], each in [1, max_blocks * block_size]. Accumulates in float32.",
        "out"_a, "q"_a, "k_cache"_a, "v_cache"_a, "block_tables"_a, "seq_lens"_a, "scale"_a);
  m.def("rms_norm", &tcpu::rms_norm,
        "out = weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype), bit for bit. x, out: "
        "[T, N] or [T, H, N] (any strides but the last dim's); weight: [N] in x's dtype or float32; out in "
        "their promoted dtype.",
        "out"_a, "x"_a, "weight"_a, "eps"_a);
  m.def("fused_add_rms_norm", &tcpu::fused_add_rms_norm,
        "In place: residual = x + residual (rounded to the dtype), then x = rms_norm(residual). x, residual: "
        "[T, N]; weight: [N]; one dtype.",
        "x"_a, "residual"_a, "weight"_a, "eps"_a);
  m.def("silu_and_mul", &tcpu::silu_and_mul,
        "out = F.silu(x[:, :I]) * x[:, I:], bit for bit. x: [T, 2I]; out: [T, I]; one dtype.", "out"_a, "x"_a);
  m.def("rotary_embedding", &tcpu::rotary_embedding,
        "In place, HF rotate-half RoPE on the first rotary_dim dims of qk: [T, H, D] (token stride free). "
        "positions: int64 [T]; cos_sin: float32 [max_positions, rotary_dim] = cat(cos, sin). Rounds as torch does.",
        "qk"_a, "positions"_a, "cos_sin"_a, "rotary_dim"_a);
  m.def("reshape_and_cache", &tcpu::reshape_and_cache,
        "k_cache/v_cache[slot_mapping[t]] = k/v[t]. k, v: [T, Hkv, D] (token stride free); caches: [num_blocks, "
        "block_size, Hkv, D]; slot_mapping: int64 [T], each in [0, num_blocks * block_size).",
        "k"_a, "v"_a, "k_cache"_a, "v_cache"_a, "slot_mapping"_a);
  m.def("bitplane_linear", &tcpu::bitplane_linear,
        "out = x @ W.T (+ bias) with W[r, k] = scale * q[r, k] + offset per group of k, q read in place from "
        "bit-plane tiles (tessera.quant.bitplanes.tile_planes). x: [M, K]; tiles: uint8 [N_pad/16, K_pad/8, "
        "bits, 16]; scale, offset: float32 [N_pad/16, groups, 16]; n: rows of W; bias: [n] or None; out: "
        "contiguous [M, n], float32/bfloat16/float16. act_bits: 0 = exact (fp32 sums of the activations as "
        "given), 8 = x quantized to int8 per weight group and integer dot products (bitplane_i8.h).",
        "out"_a, "x"_a, "tiles"_a, "scale"_a, "offset"_a, "n"_a, "bias"_a = pybind11::none(), "act_bits"_a = 0);
  m.def("bitplane_dequantize_t", &tcpu::bitplane_dequantize_t,
        "out[k, r] = W[row0 + r, k] = scale * q + offset (two fp32 roundings, as torch's q * scale + offset): rows "
        "of W transposed, row0 a multiple of 16, in float32/bfloat16/float16. "
        "out: [K, rows] with unit column stride (a column slice of a wider buffer is fine).",
        "out"_a, "tiles"_a, "scale"_a, "offset"_a, "row0"_a);
  m.def("lora_sgmv", &tcpu::lora_sgmv,
        "y[a:b] += (x[a:b] @ lora_a[s]) @ lora_b[s] for each segment (a, b, s), all in one call (fp32 products, "
        "y rounded once; segments of gemm_from_rows rows or more as two ATen GEMMs). x: [T, in]; y: [T, out] (unit "
        "column stride); lora_a: [S, in, R]; lora_b: [S, R, out], block-diagonal over `slices` (each output slice "
        "(start, end) reads only its R / len(slices) rank rows; empty: one slice); one dtype (fp32/bf16/fp16).",
        "y"_a, "x"_a, "lora_a"_a, "lora_b"_a, "segments"_a, "slices"_a, "gemm_from_rows"_a);
  m.def("bitplane_gemm", &tcpu::bitplane_gemm,
        "bitplane_linear's product for batches (bitplane_gemm.cpp): with bf16 x where torch's brgemm runs AMX, "
        "blocks of 32 weight rows dequantized to bf16 in the VNNI layout and multiplied by cpublas::brgemm; "
        "elsewhere blocks of block_weights weights through bitplane_dequantize_t and at::linear.",
        "out"_a, "x"_a, "tiles"_a, "scale"_a, "offset"_a, "n"_a, "bias"_a, "block_weights"_a);
  m.def("sample_rows", &tcpu::sample_rows,
        "out[r] = a token drawn from softmax(logits[r] / temps[r]) by inverse CDF at uniform[r] (sampling.cpp: the "
        "numbers of torch's divide, exp, double cumsum and searchsorted; never a token of weight 0). logits: float32 "
        "[rows, vocab], unit column stride; temps, uniform: float32 [rows]; out: int64 [rows].",
        "out"_a, "logits"_a, "temps"_a, "uniform"_a);
  m.def("_bitplane_gemm_uses_brgemm", &tcpu::bitplane_gemm_uses_brgemm,
        "whether bitplane_gemm takes the brgemm path for bf16 x here");
  m.def("_set_sum_lanes", &tcpu::set_sum_lanes, "the vector width of torch's sum kernel that rms_norm reproduces");
  m.def("_get_sum_lanes", &tcpu::get_sum_lanes);
  m.def("_set_bitplane_dp_min_bits", &tcpu::set_bitplane_dp_min_bits,
        "bf16 x with this many planes or more (up to 4) takes the codes-and-dot-products kernel (9: never); "
        "returns the previous setting");
#if defined(TCPU_BITPLANE_DP)
  m.attr("bitplane_dp") = true;
#else
  m.attr("bitplane_dp") = false;
#endif
  tcpu::register_decode_stack(m);
  m.attr("isa") = TCPU_ISA;
  m.attr("lanes") = tcpu::kLanes;
}
