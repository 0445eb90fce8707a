// A decode step's whole stack of decoder layers in one call (steps whose rows are all one-token
// decodes). It runs the kernels the Python layers run (tessera/models/llama.py through
// ops/backend.py's CpuKernelBackend and the linear methods of ops/linear.py and quant/bits_linear.py),
// in the same order on the same kinds of buffers, so its result is the Python path's bit for bit (the
// tests compare logits with torch.equal). What goes is the Python around them: some 25 interpreted
// calls per layer, about 150 us a layer on a 2-core Xeon, half the time of a single-stream token of
// the 135M default model.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace tcpu {

// One step's LoRA plan (tessera/lora/manager.py's LoRAStep on a CPU with these kernels): row ranges of
// one slot each, all added by lora_sgmv (lora_sgmv.cpp) in one call per linear.
struct LoRAPlan {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> segments;  // (start, end, slot)
  int64_t gemm_from_rows = 0;                                    // lora_sgmv's: longer segments as GEMMs
  bool empty() const { return segments.empty(); }
};

// One step's variants (tessera/blockllm/runtime.py's VariantStep): maximal row ranges of one variant
// each, in row order (the runner sorts a step's rows by variant). Empty: every row on the first variant.
using VariantRuns = std::vector<std::tuple<int64_t, int64_t, int64_t>>;  // (start, end, variant)

// One Linear, as its LinearMethod multiplies it.
struct LinearOp {
  enum Kind : int64_t { kDense = 0, kOneDNN = 1, kBits = 2, kBitsA8 = 3 };  // kBitsA8: int8 activations
  int64_t kind = kDense;
  torch::Tensor weight;  // dense / oneDNN: the plain weight (oneDNN still uses it for big and fp32 single rows)
  torch::Tensor packed;  // oneDNN: the reordered weight
  torch::Tensor tiles, scale, offset;  // bits: the planes and per-group parameters in the kernel's tiles
  c10::optional<torch::Tensor> bias;
  int64_t n = 0, k = 0;
  int64_t dense_from_rows = 256;  // oneDNN: OneDNNPackedLinear.dense_from_rows
  int64_t gemm_from_rows = 32, block_weights = 1 << 20;  // bits: BitsLinearMethod's
  // LoRA slots (tessera/lora/layer.py's LoRALinearMethod): A [S, in, R], s * B [S, R, out], and the
  // fused layer's output slices (start, end) whose rank blocks the expand reads.
  c10::optional<torch::Tensor> lora_a, lora_b;
  std::vector<std::pair<int64_t, int64_t>> lora_slices;
  // BlockLLM (tessera/blockllm/runtime.py's VariantLinearMethod): a block that differs between variants.
  // versions[v - 1] multiplies version v (version 0 is this op's own weight); version_of[variant].
  std::vector<LinearOp> versions;
  std::vector<int64_t> version_of;

  // The base product plus, with a plan, the adapters' (the Python method's call: the same bits).
  torch::Tensor operator()(const torch::Tensor& x, const LoRAPlan* plan = nullptr,
                           const VariantRuns* variants = nullptr) const {
    auto y = (versions.empty() || variants == nullptr || variants->empty()) ? base(x) : per_version(x, *variants);
    if (plan == nullptr || !lora_a.has_value() || plan->empty()) return y;
    lora_sgmv(y, x, *lora_a, *lora_b, plan->segments, lora_slices, plan->gemm_from_rows);
    return y;
  }

  // VariantLinearMethod.apply: each maximal row range of one version through that version's product
  // (one range: the version's product of all of x).
  torch::Tensor per_version(const torch::Tensor& x, const VariantRuns& runs) const {
    std::vector<std::tuple<int64_t, int64_t, int64_t>> segs;  // (start, end, version)
    for (const auto& [a, b, variant] : runs) {
      const int64_t v = version_of.at(variant);
      if (!segs.empty() && std::get<2>(segs.back()) == v && std::get<1>(segs.back()) == a) {
        std::get<1>(segs.back()) = b;
      } else {
        segs.emplace_back(a, b, v);
      }
    }
    auto op = [&](int64_t v) -> const LinearOp& { return v == 0 ? *this : versions.at(v - 1); };
    if (segs.size() == 1) return op(std::get<2>(segs[0])).base(x);
    auto y = x.new_empty({x.size(0), n});
    for (const auto& [a, b, v] : segs) y.slice(0, a, b).copy_(op(v).base(x.slice(0, a, b)));
    return y;
  }

  torch::Tensor base(const torch::Tensor& x) const {
    const int64_t rows = x.size(0);
    if (kind == kDense) return at::linear(x, weight, bias);
    if (kind == kOneDNN) {
      if (rows >= dense_from_rows || (rows == 1 && x.scalar_type() == at::kFloat)) return at::linear(x, weight, bias);
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, c10::string_view,
                                                   c10::List<std::optional<at::Scalar>>,
                                                   std::optional<c10::string_view>)>();
      std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(*bias) : std::nullopt;
      return op.call(x, packed, b, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
    }
    auto out = x.new_empty({rows, n});
    if (kind == kBitsA8 || rows < gemm_from_rows) {  // int8 activations: that kernel at every batch size
      bitplane_linear(out, x, tiles, scale, offset, n, bias, kind == kBitsA8 ? 8 : 0);
      return out;
    }
    bitplane_gemm(out, x, tiles, scale, offset, n, bias, block_weights);  // BitsLinearMethod's batched path
    return out;
  }
};

struct DecoderLayerOp {
  LinearOp qkv, o, gate_up, down;
  torch::Tensor input_norm, post_norm;
  c10::optional<torch::Tensor> q_norm, k_norm;
  torch::Tensor k_cache, v_cache;
};

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {}

  static LinearOp linear(int64_t kind, torch::Tensor weight, torch::Tensor packed, torch::Tensor tiles,
                         torch::Tensor scale, torch::Tensor offset, c10::optional<torch::Tensor> bias, int64_t n,
                         int64_t k, int64_t dense_from_rows, int64_t gemm_from_rows, int64_t block_weights) {
    TORCH_CHECK(kind >= LinearOp::kDense && kind <= LinearOp::kBitsA8, "decode stack: unknown linear kind ", kind);
    return LinearOp{kind, weight, packed, tiles, scale, offset, bias, n, k, dense_from_rows, gemm_from_rows,
                    block_weights};
  }

  // `base` with LoRA slots added (their contents may change between steps; the tensors may not).
  static LinearOp with_lora(LinearOp base, torch::Tensor lora_a, torch::Tensor lora_b,
                            std::vector<std::pair<int64_t, int64_t>> slices) {
    TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_a.size(0) == lora_b.size(0) &&
                    lora_a.size(2) == lora_b.size(1) && lora_b.size(2) == base.n,
                "decode stack: LoRA slots [S, in, R] and [S, R, out] do not fit the layer");
    base.lora_a = lora_a;
    base.lora_b = lora_b;
    base.lora_slices = std::move(slices);
    return base;
  }

  // `base` for a block whose variants differ: `others` multiply versions 1.., version_of[variant].
  static LinearOp with_versions(LinearOp base, std::vector<LinearOp> others, std::vector<int64_t> version_of) {
    for (const auto& o : others)
      TORCH_CHECK(o.n == base.n && o.k == base.k && o.versions.empty(), "decode stack: a version does not fit");
    for (const auto v : version_of)
      TORCH_CHECK(0 <= v && v <= static_cast<int64_t>(others.size()), "decode stack: bad version ", v);
    base.versions = std::move(others);
    base.version_of = std::move(version_of);
    return base;
  }

  // The next forward's variant runs (cleared by clear_variant_step; the engine sets them per step).
  void set_variant_step(VariantRuns runs) { variants_ = std::move(runs); }
  void clear_variant_step() { variants_.clear(); }

  // The next forward's LoRA plan (cleared by clear_lora_step; the engine sets one per step).
  void set_lora_step(std::vector<std::tuple<int64_t, int64_t, int64_t>> segments, int64_t gemm_from_rows) {
    plan_ = LoRAPlan{std::move(segments), gemm_from_rows};
  }
  void clear_lora_step() { plan_ = LoRAPlan{}; }

  void add_layer(std::vector<LinearOp> linears, torch::Tensor input_norm, torch::Tensor post_norm,
                 c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, torch::Tensor k_cache,
                 torch::Tensor v_cache) {
    TORCH_CHECK(linears.size() == 4, "decode stack: a layer has 4 linears (qkv, o, gate_up, down)");
    layers_.push_back({linears[0], linears[1], linears[2], linears[3], input_norm, post_norm, q_norm, k_norm,
                       k_cache, v_cache});
  }

  // x: the embeddings [T, hidden]. Returns (x, residual) after the last layer, as the Python loop does.
  std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin,
                                     torch::Tensor slot_mapping, torch::Tensor block_tables,
                                     torch::Tensor seq_lens) const {
    const int64_t t = x.size(0), hq = num_heads_, hkv = num_kv_heads_, d = head_dim_;
    const int64_t q_size = hq * d, kv_size = hkv * d;
    torch::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecoderLayerOp& L = layers_[i];
      if (i == 0) {
        residual = x;
        auto normed = torch::empty_like(x);
        rms_norm(normed, x, L.input_norm, eps_);
        x = normed;
      } else {
        fused_add_rms_norm(x, residual, L.input_norm, eps_);
      }
      auto qkv = L.qkv(x, &plan_, &variants_);
      auto qk = qkv.slice(1, 0, q_size + kv_size).view({t, hq + hkv, d});
      auto v = qkv.slice(1, q_size + kv_size).view({t, hkv, d});
      if (L.q_norm.has_value()) {
        auto qn = qk.slice(1, 0, hq).new_empty({t, hq, d});
        rms_norm(qn, qk.slice(1, 0, hq), *L.q_norm, eps_);
        auto kn = qk.slice(1, hq).new_empty({t, hkv, d});
        rms_norm(kn, qk.slice(1, hq), *L.k_norm, eps_);
        qk = torch::cat({qn, kn}, 1);
      }
      rotary_embedding(qk, positions, cos_sin, d);
      auto q = qk.slice(1, 0, hq), k = qk.slice(1, hq);
      reshape_and_cache(k, v, L.k_cache, L.v_cache, slot_mapping);
      auto o = torch::empty_like(q);
      paged_decode_attention(o, q.contiguous(), L.k_cache, L.v_cache, block_tables, seq_lens, scale_);
      x = L.o(o.view({t, q_size}), &plan_, &variants_);
      fused_add_rms_norm(x, residual, L.post_norm, eps_);
      auto gate_up = L.gate_up(x, &plan_, &variants_);
      auto act = gate_up.new_empty({t, gate_up.size(1) / 2});
      silu_and_mul(act, gate_up);
      x = L.down(act, &plan_, &variants_);
    }
    return {x, residual};
  }

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<DecoderLayerOp> layers_;
  LoRAPlan plan_;
  VariantRuns variants_;
};

void register_decode_stack(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  // module_local: builds of this module for other instruction sets (tests load an AVX2 and a portable
  // build beside the native one) each register their own types instead of clashing in pybind's registry.
  py::class_<LinearOp>(m, "LinearOp", py::module_local());
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, double, double>(), "num_heads"_a, "num_kv_heads"_a, "head_dim"_a,
           "eps"_a, "scale"_a)
      .def_static("linear", &DecodeStack::linear, "kind"_a, "weight"_a, "packed"_a, "tiles"_a, "scale"_a,
                  "offset"_a, "bias"_a, "n"_a, "k"_a, "dense_from_rows"_a, "gemm_from_rows"_a, "block_weights"_a)
      .def_static("with_lora", &DecodeStack::with_lora, "base"_a, "lora_a"_a, "lora_b"_a, "slices"_a)
      .def("set_lora_step", &DecodeStack::set_lora_step, "segments"_a, "gemm_from_rows"_a)
      .def("clear_lora_step", &DecodeStack::clear_lora_step)
      .def_static("with_versions", &DecodeStack::with_versions, "base"_a, "others"_a, "version_of"_a)
      .def("set_variant_step", &DecodeStack::set_variant_step, "runs"_a)
      .def("clear_variant_step", &DecodeStack::clear_variant_step)
      .def("add_layer", &DecodeStack::add_layer, "linears"_a, "input_norm"_a, "post_norm"_a, "q_norm"_a,
           "k_norm"_a, "k_cache"_a, "v_cache"_a)
      .def("forward", &DecodeStack::forward, "x"_a, "positions"_a, "cos_sin"_a, "slot_mapping"_a,
           "block_tables"_a, "seq_lens"_a, py::call_guard<py::gil_scoped_release>());
}
}  // namespace tcpu
