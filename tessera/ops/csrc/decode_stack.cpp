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

// One step's LoRA plan (tessera/lora/manager.py's LoRAStep, minus the CUDA kernel's input): row ranges
// of one slot each (segments), and the decode rows of several adapters as one padded group.
struct LoRAPlan {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> segments;  // (start, end, slot)
  int64_t length = 0;                                            // the group's rows per member; 0: no group
  torch::Tensor pad_index, rows, back_index;
  c10::optional<torch::Tensor> slots;  // the group's members (None: every slot, in order)
  bool empty() const { return segments.empty() && length == 0; }
};

// One Linear, as its LinearMethod multiplies it.
struct LinearOp {
  enum Kind : int64_t { kDense = 0, kOneDNN = 1, kBits = 2 };
  int64_t kind = kDense;
  torch::Tensor weight;  // dense / oneDNN: the plain weight (oneDNN still uses it for big and fp32 single rows)
  torch::Tensor packed;  // oneDNN: the reordered weight
  torch::Tensor tiles, scale, offset;  // bits: the planes and per-group parameters in the kernel's tiles
  c10::optional<torch::Tensor> bias;
  int64_t n = 0, k = 0;
  int64_t dense_from_rows = 256;  // oneDNN: OneDNNPackedLinear.dense_from_rows
  int64_t gemm_from_rows = 32, block_weights = 1 << 20;  // bits: BitsLinearMethod's
  // LoRA slots (tessera/lora/layer.py's LoRALinearMethod): A [S, in, R], s * B [S, R, out], and the
  // fused layer's output slices (start, end) whose rank blocks the padded group's expand reads.
  c10::optional<torch::Tensor> lora_a, lora_b;
  std::vector<std::pair<int64_t, int64_t>> lora_slices;

  // The base product plus, with a plan, the adapters' (the same ops in the same order as
  // add_lora_group then add_lora_segments, so the same bits).
  torch::Tensor operator()(const torch::Tensor& x, const LoRAPlan* plan = nullptr) const {
    auto y = base(x);
    if (plan == nullptr || !lora_a.has_value() || plan->empty()) return y;
    const auto& A = *lora_a;
    const auto& B = *lora_b;
    if (plan->length > 0) {
      auto a = plan->slots.has_value() ? A.index_select(0, *plan->slots) : A;
      auto b = plan->slots.has_value() ? B.index_select(0, *plan->slots) : B;
      const int64_t g = a.size(0), len = plan->length;
      auto xp = x.index_select(0, plan->pad_index).to(a.scalar_type()).view({g, len, x.size(1)});
      auto h = torch::bmm(xp, a);
      torch::Tensor d;
      if (lora_slices.size() <= 1) {
        d = torch::bmm(h, b);
      } else {
        d = h.new_empty({g, len, y.size(1)});
        const int64_t r = a.size(2) / static_cast<int64_t>(lora_slices.size());
        for (size_t j = 0; j < lora_slices.size(); ++j) {
          const auto [o0, o1] = lora_slices[j];
          const int64_t r0 = static_cast<int64_t>(j) * r;
          d.slice(2, o0, o1).copy_(torch::bmm(h.slice(2, r0, r0 + r), b.slice(1, r0, r0 + r).slice(2, o0, o1)));
        }
      }
      y.index_add_(0, plan->rows, d.view({-1, y.size(1)}).index_select(0, plan->back_index).to(y.scalar_type()));
    }
    for (const auto& [s0, s1, slot] : plan->segments) {
      auto h = torch::mm(x.slice(0, s0, s1).to(A.scalar_type()), A[slot]);
      y.slice(0, s0, s1).add_(torch::mm(h, B[slot]));
    }
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
    if (rows < gemm_from_rows) {
      bitplane_linear(out, x, tiles, scale, offset, n, bias);
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
    TORCH_CHECK(kind >= LinearOp::kDense && kind <= LinearOp::kBits, "decode stack: unknown linear kind ", kind);
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

  // The next forward's LoRA plan (cleared by clear_lora_step; the engine sets one per step).
  void set_lora_step(std::vector<std::tuple<int64_t, int64_t, int64_t>> segments, int64_t length,
                     c10::optional<torch::Tensor> pad_index, c10::optional<torch::Tensor> rows,
                     c10::optional<torch::Tensor> back_index, c10::optional<torch::Tensor> slots) {
    plan_ = LoRAPlan{std::move(segments), length, pad_index.value_or(torch::Tensor()),
                     rows.value_or(torch::Tensor()), back_index.value_or(torch::Tensor()), slots};
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
      auto qkv = L.qkv(x, &plan_);
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
      x = L.o(o.view({t, q_size}), &plan_);
      fused_add_rms_norm(x, residual, L.post_norm, eps_);
      auto gate_up = L.gate_up(x, &plan_);
      auto act = gate_up.new_empty({t, gate_up.size(1) / 2});
      silu_and_mul(act, gate_up);
      x = L.down(act, &plan_);
    }
    return {x, residual};
  }

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<DecoderLayerOp> layers_;
  LoRAPlan plan_;
};

void register_decode_stack(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  py::class_<LinearOp>(m, "LinearOp");
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double>(), "num_heads"_a, "num_kv_heads"_a, "head_dim"_a,
           "eps"_a, "scale"_a)
      .def_static("linear", &DecodeStack::linear, "kind"_a, "weight"_a, "packed"_a, "tiles"_a, "scale"_a,
                  "offset"_a, "bias"_a, "n"_a, "k"_a, "dense_from_rows"_a, "gemm_from_rows"_a, "block_weights"_a)
      .def_static("with_lora", &DecodeStack::with_lora, "base"_a, "lora_a"_a, "lora_b"_a, "slices"_a)
      .def("set_lora_step", &DecodeStack::set_lora_step, "segments"_a, "length"_a, "pad_index"_a, "rows"_a,
           "back_index"_a, "slots"_a)
      .def("clear_lora_step", &DecodeStack::clear_lora_step)
      .def("add_layer", &DecodeStack::add_layer, "linears"_a, "input_norm"_a, "post_norm"_a, "q_norm"_a,
           "k_norm"_a, "k_cache"_a, "v_cache"_a)
      .def("forward", &DecodeStack::forward, "x"_a, "positions"_a, "cos_sin"_a, "slot_mapping"_a,
           "block_tables"_a, "seq_lens"_a, py::call_guard<py::gil_scoped_release>());
}
}  // namespace tcpu
