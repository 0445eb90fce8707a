// Fused elementwise kernels for CPUs: RMSNorm (plain and with the residual add), SiLU-and-mul,
// rotary embedding, and the KV cache write. fp32, bf16 and fp16, parallel over tokens.
//
// Each reproduces tessera's torch op sequence bit for bit: every intermediate that torch stores in a
// tensor of the input dtype is rounded to that dtype here too, float ops are never reassociated or
// fused (the module is built with -ffp-contract=off), exp is Sleef's expf_u10 as in torch's
// vectorised kernels, and RMSNorm's mean adds the squares in the order of torch's sum kernel
// (aten/src/ATen/native/cpu/SumKernel.cpp, whose vector width is set at load, see sum_lanes).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace tcpu {

// Lanes of torch's Vectorized<float> in its sum kernel: 8 with AVX2 (also what an AVX-512 host
// runs, the sum kernel has no AVX-512 build), 16 when it has one, 4 on NEON. cpu_kernels.py
// finds the value torch actually uses by comparing against torch once, at load.
static int g_sum_lanes = 8;

void set_sum_lanes(int64_t lanes) {
  TORCH_CHECK(lanes == 1 || lanes == 4 || lanes == 8 || lanes == 16 || lanes == 32, "sum_lanes must be 1, 4, 8, 16 or 32");
  g_sum_lanes = static_cast<int>(lanes);
}
int64_t get_sum_lanes() { return g_sum_lanes; }

namespace {

// Rows per parallel chunk: about 16K elements of work each.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

// ---- torch's cascade sum --------------------------------------------------------------------
// multi_row_sum<Vectorized<float>, 4> / row_sum / vectorized_inner_sum, with a "vector" of L lanes
// loaded by load(index, dst). Same adds, same order.
template <int L, typename Load>
void multi_row_sum4(const Load& load, int64_t size, float ret[4][L]) {
  constexpr int levels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / levels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[levels][4][L] = {};
  float tmp[L];
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) {
        load(4 * i + k, tmp);
        for (int e = 0; e < L; ++e) acc[0][k][e] += tmp[e];
      }
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int e = 0; e < L; ++e) {
          acc[j][k][e] += acc[j - 1][k][e];
          acc[j - 1][k][e] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) {
      load(4 * i + k, tmp);
      for (int e = 0; e < L; ++e) acc[0][k][e] += tmp[e];
    }
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < 4; ++k)
      for (int e = 0; e < L; ++e) acc[0][k][e] += acc[j][k][e];
  for (int k = 0; k < 4; ++k)
    for (int e = 0; e < L; ++e) ret[k][e] = acc[0][k][e];
}

template <int L, typename Load>
void row_sum(const Load& load, int64_t size, float out[L]) {
  float part[4][L];
  const int64_t size_ilp = size / 4;
  multi_row_sum4<L>(load, size_ilp, part);
  float tmp[L];
  for (int64_t i = size_ilp * 4; i < size; ++i) {
    load(i, tmp);
    for (int e = 0; e < L; ++e) part[0][e] += tmp[e];
  }
  for (int k = 1; k < 4; ++k)
    for (int e = 0; e < L; ++e) part[0][e] += part[k][e];
  for (int e = 0; e < L; ++e) out[e] = part[0][e];
}

// sum(float(x[i])^2 for i < n), added as torch's sum over a contiguous fp32 row does
// (vectorized_inner_sum with W-lane vectors). The 4 vectors of one ilp group are 4W consecutive
// elements and their 4 accumulators' lanes are independent, so the main loop adds whole groups
// with our own vectors, whatever their width; the few steps that mix lanes follow torch exactly.
template <int W, typename T>
float torch_sum_squares(const T* x, int64_t n) {
  auto sq = [x](int64_t i) {
    const float f = to_float(x[i]);
    return f * f;
  };
  if (n < W) {  // scalar_inner_sum
    float r[1];
    row_sum<1>([&](int64_t i, float* dst) { dst[0] = sq(i); }, n, r);
    return r[0];
  }
  constexpr int kGroup = 4 * W;  // floats per ilp group
  if constexpr (kGroup % kLanes != 0) {
    float vacc[W];
    row_sum<W>([&](int64_t v, float* dst) { for (int e = 0; e < W; ++e) dst[e] = sq(v * W + e); }, n / W, vacc);
    float final_acc = 0.f;
    for (int64_t k = n / W * W; k < n; ++k) final_acc += sq(k);
    for (int e = 0; e < W; ++e) final_acc += vacc[e];
    return final_acc;
  } else {
    constexpr int NV = kGroup / kLanes, levels = 4;
    const int64_t vec_size = n / W, size_ilp = vec_size / 4;
    // multi_row_sum over the groups
    const int64_t level_power = std::max<int64_t>(4, ceil_log2(size_ilp) / levels);
    const int64_t level_step = int64_t(1) << level_power;
    const int64_t level_mask = level_step - 1;
    VF acc[levels][NV];
    for (int j = 0; j < levels; ++j)
      for (int c = 0; c < NV; ++c) acc[j][c] = vzero();
    auto add_group = [&](int64_t i) {
      for (int c = 0; c < NV; ++c) {
        const VF v = vload(x + i * kGroup + c * kLanes);
        acc[0][c] = acc[0][c] + v * v;
      }
    };
    int64_t i = 0;
    for (; i + level_step <= size_ilp;) {
      for (int64_t j = 0; j < level_step; ++j, ++i) add_group(i);
      for (int j = 1; j < levels; ++j) {
        for (int c = 0; c < NV; ++c) {
          acc[j][c] = acc[j][c] + acc[j - 1][c];
          acc[j - 1][c] = vzero();
        }
        if ((i & (level_mask << (j * level_power))) != 0) break;
      }
    }
    for (; i < size_ilp; ++i) add_group(i);
    for (int j = 1; j < levels; ++j)
      for (int c = 0; c < NV; ++c) acc[0][c] = acc[0][c] + acc[j][c];
    float part[kGroup];  // the 4 accumulators, W lanes each
    for (int c = 0; c < NV; ++c) vstore(part + c * kLanes, acc[0][c]);
    // row_sum: the vectors past the last whole group into accumulator 0, then 1..3 into it
    for (int64_t v = size_ilp * 4; v < vec_size; ++v)
      for (int e = 0; e < W; ++e) part[e] += sq(v * W + e);
    for (int k = 1; k < 4; ++k)
      for (int e = 0; e < W; ++e) part[e] += part[k * W + e];
    // vectorized_inner_sum: the elements past the last vector, then the lanes in order
    float final_acc = 0.f;
    for (int64_t k = vec_size * W; k < n; ++k) final_acc += sq(k);
    for (int e = 0; e < W; ++e) final_acc += part[e];
    return final_acc;
  }
}

template <typename T>
float sum_squares(const T* x, int64_t n) {
  switch (g_sum_lanes) {
    case 1:
      return torch_sum_squares<1>(x, n);
    case 4:
      return torch_sum_squares<4>(x, n);
    case 16:
      return torch_sum_squares<16>(x, n);
    case 32:
      return torch_sum_squares<32>(x, n);
    default:
      return torch_sum_squares<8>(x, n);
  }
}

// out = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(X), in the dtype torch's
// promotion gives weight * X.
template <typename X, typename Wt, typename O>
void rms_norm_row(O* out, const X* x, const Wt* w, int64_t n, float eps) {
  const float mean = sum_squares(x, n) / static_cast<float>(n);
  const VF r = vset1(1.f / std::sqrt(mean + eps));
  const int64_t full = n / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes)
    vstore(out + i, vload(w + i) * vround<X>(vload(x + i) * r));
  if (full < n) {
    const int rest = static_cast<int>(n - full);
    vstore_n(out + full, vload_n(w + full, rest) * vround<X>(vload_n(x + full, rest) * r), rest);
  }
}

void check_cpu(const torch::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, name, " must be a CPU tensor, got one on ", t.device());
}

void check_float_dtype(const torch::Tensor& t, const char* fn, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, fn, name,
              " must be float32, bfloat16 or float16, got ", d);
}

// [rows, n] with unit stride along n; rows may be strided.
void check_rows(const torch::Tensor& t, int64_t n, const char* fn, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == n, fn, name, " must be [num_tokens, ", n, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, fn, name, " must be contiguous along its last dim");
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(bf16{});
    default:
      return f(f16{});
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps) {
  constexpr const char* fn = "rms_norm: ";
  check_cpu(out, fn, "out"), check_cpu(x, fn, "x"), check_cpu(weight, fn, "weight");
  check_float_dtype(x, fn, "x"), check_float_dtype(weight, fn, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), fn, "weight must be a contiguous 1-d tensor");
  const int64_t n = weight.size(0);
  // [T, N] or [T, H, N] (per-head norms, e.g. a slice of the fused q/k tensor): any strides but the
  // last dim's.
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.size(-1) == n, fn, "x must be [num_tokens, ", n,
              "] or [num_tokens, num_heads, ", n, "], got ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), fn, "out ", out.sizes(), " must have x's shape ", x.sizes());
  for (const auto& [t, name] : {std::pair{&x, "x"}, {&out, "out"}})
    TORCH_CHECK(t->stride(-1) == 1 || n <= 1, fn, name, " must be contiguous along its last dim");
  const auto xd = x.scalar_type(), wd = weight.scalar_type();
  const auto od = at::promote_types(xd, wd);
  TORCH_CHECK(out.scalar_type() == od, fn, "out must be ", od, " (weight * x's dtype), got ", out.scalar_type());
  TORCH_CHECK(wd == xd || wd == at::kFloat, fn, "weight must be x's dtype or float32, got ", wd, " with x ", xd);
  const bool per_head = x.dim() == 3;
  const int64_t H = per_head ? x.size(1) : 1, rows = x.size(0) * H;
  const int64_t xs0 = x.stride(0), xs1 = per_head ? x.stride(1) : 0;
  const int64_t os0 = out.stride(0), os1 = per_head ? out.stride(1) : 0;
  const float e = static_cast<float>(eps);
  dispatch_float(xd, [&](auto xt) {
    using X = decltype(xt);
    const X* xp = x.data_ptr<X>();
    auto go = [&](auto* wp, auto* op) {
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t end) {
        for (int64_t r = b; r < end; ++r) {
          const int64_t t = r / H, h = r % H;
          rms_norm_row(op + t * os0 + h * os1, xp + t * xs0 + h * xs1, wp, n, e);
        }
      });
    };
    if (wd == xd)
      go(weight.data_ptr<X>(), out.data_ptr<X>());
    else
      go(weight.data_ptr<float>(), out.data_ptr<float>());
  });
}

void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  constexpr const char* fn = "fused_add_rms_norm: ";
  check_cpu(x, fn, "x"), check_cpu(residual, fn, "residual"), check_cpu(weight, fn, "weight");
  check_float_dtype(x, fn, "x");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(), fn,
              "x, residual and weight must share one dtype, got ", x.scalar_type(), ", ", residual.scalar_type(),
              ", ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), fn, "weight must be a contiguous 1-d tensor");
  const int64_t n = weight.size(0);
  check_rows(x, n, fn, "x");
  check_rows(residual, n, fn, "residual");
  TORCH_CHECK(residual.size(0) == x.size(0), fn, "residual has ", residual.size(0), " rows, x ", x.size(0));
  const int64_t rows = x.size(0), xs = x.stride(0), rs = residual.stride(0);
  const float e = static_cast<float>(eps);
  dispatch_float(x.scalar_type(), [&](auto xt) {
    using X = decltype(xt);
    X* xp = x.data_ptr<X>();
    X* rp = residual.data_ptr<X>();
    const X* wp = weight.data_ptr<X>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t end) {
      for (int64_t r = b; r < end; ++r) {
        X* xr = xp + r * xs;
        X* rr = rp + r * rs;
        const int64_t full = n / kLanes * kLanes;
        for (int64_t i = 0; i < full; i += kLanes) vstore(rr + i, vload(xr + i) + vload(rr + i));
        if (full < n) {
          const int rest = static_cast<int>(n - full);
          vstore_n(rr + full, vload_n(xr + full, rest) + vload_n(rr + full, rest), rest);
        }
        rms_norm_row(xr, rr, wp, n, e);
      }
    });
  });
}

void silu_and_mul(torch::Tensor out, torch::Tensor x) {
  constexpr const char* fn = "silu_and_mul: ";
  check_cpu(out, fn, "out"), check_cpu(x, fn, "x");
  check_float_dtype(x, fn, "x");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), fn, "out is ", out.scalar_type(), " but x is ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, fn, "x must be [num_tokens, 2 * intermediate], got ", x.sizes());
  const int64_t n = x.size(1) / 2;
  check_rows(x, 2 * n, fn, "x");
  check_rows(out, n, fn, "out");
  TORCH_CHECK(out.size(0) == x.size(0), fn, "out has ", out.size(0), " rows, x ", x.size(0));
  const int64_t rows = x.size(0), xs = x.stride(0), os = out.stride(0);
  dispatch_float(x.scalar_type(), [&](auto xt) {
    using X = decltype(xt);
    const X* xp = x.data_ptr<X>();
    X* op = out.data_ptr<X>();
    // F.silu(gate) * up: silu = g / (1 + exp(-g)) in fp32, stored as X, then the product.
    auto f = [](VF g, VF u) { return vround<X>(g / (vset1(1.f) + vexp(vset1(-1.f) * g))) * u; };
    at::parallel_for(0, rows, grain_rows(n * 4), [&](int64_t b, int64_t end) {
      for (int64_t r = b; r < end; ++r) {
        const X* gate = xp + r * xs;
        const X* up = gate + n;
        X* o = op + r * os;
        const int64_t full = n / kLanes * kLanes;
        for (int64_t i = 0; i < full; i += kLanes) vstore(o + i, f(vload(gate + i), vload(up + i)));
        if (full < n) {
          const int rest = static_cast<int>(n - full);
          vstore_n(o + full, f(vload_n(gate + full, rest), vload_n(up + full, rest)), rest);
        }
      }
    });
  });
}

void rotary_embedding(torch::Tensor qk, torch::Tensor positions, torch::Tensor cos_sin, int64_t rotary_dim) {
  constexpr const char* fn = "rotary_embedding: ";
  check_cpu(qk, fn, "qk"), check_cpu(positions, fn, "positions"), check_cpu(cos_sin, fn, "cos_sin");
  check_float_dtype(qk, fn, "qk");
  TORCH_CHECK(qk.dim() == 3, fn, "qk must be [num_tokens, num_heads, head_dim], got ", qk.sizes());
  const int64_t T = qk.size(0), H = qk.size(1), D = qk.size(2);
  TORCH_CHECK(qk.stride(2) == 1 && (H <= 1 || qk.stride(1) == D), fn,
              "qk's heads must be contiguous rows of head_dim (only the token stride is free), got strides ",
              qk.strides());
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D, fn, "rotary_dim ", rotary_dim,
              " must be even and in (0, head_dim = ", D, "]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.size(1) == rotary_dim &&
                  cos_sin.is_contiguous(),
              fn, "cos_sin must be a contiguous float32 [max_positions, rotary_dim = ", rotary_dim, "] table, got ",
              cos_sin.scalar_type(), " ", cos_sin.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T, fn,
              "positions must be int64 [num_tokens = ", T, "], got ", positions.scalar_type(), " ", positions.sizes());
  const torch::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t max_pos = cos_sin.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, fn, "positions[", t, "] = ", pp[t], " is outside the table [0, ",
                max_pos, ")");
  const int64_t half = rotary_dim / 2, ts = qk.stride(0);
  const float* table = cos_sin.data_ptr<float>();
  dispatch_float(qk.scalar_type(), [&](auto xt) {
    using X = decltype(xt);
    X* base = qk.data_ptr<X>();
    at::parallel_for(0, T, grain_rows(H * rotary_dim), [&](int64_t b, int64_t end) {
      // torch: cos = cos_sin[positions].to(X); out = cat(x1*cos - x2*sin, x2*cos + x1*sin), each op in X.
      std::vector<float> cs(2 * half);
      for (int64_t t = b; t < end; ++t) {
        const float* row = table + pp[t] * rotary_dim;
        for (int64_t i = 0; i < 2 * half; ++i) cs[i] = round_to<X>(row[i]);
        const float* c = cs.data();
        const float* s = cs.data() + half;
        for (int64_t h = 0; h < H; ++h) {
          X* x1 = base + t * ts + h * D;
          X* x2 = x1 + half;
          auto rot = [](VF a, VF b, VF cv, VF sv, VF& o1, VF& o2) {
            o1 = vround<X>(a * cv) - vround<X>(b * sv);
            o2 = vround<X>(b * cv) + vround<X>(a * sv);
          };
          int64_t i = 0;
          for (; i + kLanes <= half; i += kLanes) {
            VF o1, o2;
            rot(vload(x1 + i), vload(x2 + i), vload(c + i), vload(s + i), o1, o2);
            vstore(x1 + i, o1);
            vstore(x2 + i, o2);
          }
          if (i < half) {
            const int rest = static_cast<int>(half - i);
            VF o1, o2;
            rot(vload_n(x1 + i, rest), vload_n(x2 + i, rest), vload_n(c + i, rest), vload_n(s + i, rest), o1, o2);
            vstore_n(x1 + i, o1, rest);
            vstore_n(x2 + i, o2, rest);
          }
        }
      }
    });
  });
}

void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor slot_mapping) {
  constexpr const char* fn = "reshape_and_cache: ";
  check_cpu(k, fn, "k"), check_cpu(v, fn, "v"), check_cpu(k_cache, fn, "k_cache"), check_cpu(v_cache, fn, "v_cache");
  check_cpu(slot_mapping, fn, "slot_mapping");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), fn,
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), fn, "the caches must be contiguous");
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(), fn,
                name, " is ", t->scalar_type(), ", the caches ", k_cache.scalar_type(), " and ",
                v_cache.scalar_type(), " (one dtype for all)");
    TORCH_CHECK(t->dim() == 3 && t->size(1) == Hkv && t->size(2) == D, fn, name, " must be [num_tokens, ", Hkv, ", ",
                D, "], got ", t->sizes());
    TORCH_CHECK(t->stride(2) == 1 && (Hkv <= 1 || t->stride(1) == D), fn, name,
                "'s heads must be contiguous rows of head_dim (only the token stride is free)");
  }
  const int64_t T = k.size(0);
  TORCH_CHECK(v.size(0) == T, fn, "k has ", T, " tokens, v ", v.size(0));
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == T, fn,
              "slot_mapping must be int64 [num_tokens = ", T, "], got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  const torch::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, fn, "slot_mapping[", t, "] = ", sp[t],
                " is not a slot of the cache (num_blocks * block_size = ", num_slots, ")");
  const int64_t row = Hkv * D, bytes = row * k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, T, grain_rows(2 * row), [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      std::memcpy(kc + sp[t] * bytes, kp + t * ks, bytes);
      std::memcpy(vc + sp[t] * bytes, vp + t * vs, bytes);
    }
  });
}

}  // namespace tcpu
