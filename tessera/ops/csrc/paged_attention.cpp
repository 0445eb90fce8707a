// Paged decode attention for CPUs, fp32 / bf16 / fp16 (q, K/V cache and output in one dtype,
// accumulation in fp32).
//
// Each work item is one (sequence, KV head, token range): it reads its K and V once, straight from
// the blocks of its block table (no gather, no padding), and serves every query head of its group.
// Pass 1 goes through the tokens kLanes at a time (16 with AVX-512, 8 with AVX2): each query head's
// kLanes dot products are summed by one transpose-and-add tree into a vector of scores (bf16 K is
// multiplied straight from the cache with AVX512-BF16's vdpbf16ps, else converted to fp32 by a
// shift); then the scores' max and exps; pass 2 accumulates the exp-weighted V rows into fp32
// outputs (bf16 V with vdpbf16ps, on probabilities rounded to bf16 as torch's flash attention does).
// Long sequences are split into partitions when the batch alone would not keep every thread busy,
// their partial results merged by log-sum-exp. Threads take items longest first from a shared
// counter.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace tcpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMinPartition = 256;  // tokens; shorter partitions cost more to merge than they save

struct WorkItem {
  int64_t s, h, t0, t1;
  int64_t slot;  // row of the partial-result buffers, or -1: the item covers the whole sequence
};

struct Scratch {
  std::vector<float> q, o, kbuf, vbuf, s, m, l;
  std::vector<VF> lv;
};

// fp32 copies of rows (K and V rows of a tile, q, the outputs) are padded to Dp = NV * kLanes. bf16
// rows are "pair-split": each chunk of 2 * kLanes elements is stored as its even-indexed elements,
// then its odd ones (a shift and a mask convert them; see vload_pairs); a tail of head_dim shorter
// than a chunk stays in order. Dot products do not care about the order as long as q is split the
// same way; the outputs are put back in order when written.
template <typename T>
constexpr bool kSplit = std::is_same_v<T, bf16>;
constexpr int64_t kChunk = 2 * kLanes;

// NVC: vectors (of kLanes floats) per head row when fixed at compile time, 0 when not.
template <typename T, int NVC>
struct Decode {
  T* out;
  const T* q;
  const T* k_cache;
  const T* v_cache;
  const int64_t* tables;
  int64_t num_heads, group, block_size, max_blocks, head_dim, nv_rt;
  int64_t token_stride, block_stride;  // elements between tokens of a block, between blocks
  float scale;
  float* part_ml;  // [slots][G][2]: running max, sum
  float* part_o;   // [slots][G][Dp]: unnormalised output

  int64_t nv() const { return NVC > 0 ? NVC : nv_rt; }
  int64_t split_end() const { return kSplit<T> ? head_dim / kChunk * kChunk : 0; }
  // Where element d of a row lives in its fp32 copy.
  int64_t slot_of(int64_t d) const {
    if (d >= split_end()) return d;
    const int64_t j = d % kChunk;
    return d - j + (j & 1) * kLanes + j / 2;
  }

  // One row as fp32 into dst (Dp floats, zero-padded).
  void convert(const T* src, float* dst) const {
    const int64_t D = head_dim, Dp = nv() * kLanes, e = split_end();
    if constexpr (kSplit<T>) {
      for (int64_t c = 0; c < e; c += kChunk) {
        VF ev, od;
        vload_pairs(src + c, ev, od);
        vstore(dst + c, ev);
        vstore(dst + c + kLanes, od);
      }
    }
    int64_t c = e;
    for (; c + kLanes <= D; c += kLanes) vstore(dst + c, vload(src + c));
    if (c < D) vstore(dst + c, vload_n(src + c, static_cast<int>(D - c)));
    for (c = (D + kLanes - 1) / kLanes * kLanes; c < Dp; c += kLanes) vstore(dst + c, vzero());
  }

  // Rows [0, n) of a tile as fp32 (rows [converted, n) alias row 0): fp32 caches whose rows are
  // whole vectors are read in place, the others converted into buf.
  void rows(const T* const* src, int n, float* buf, const float** dst, int converted) const {
    const int64_t Dp = nv() * kLanes;
    if constexpr (std::is_same_v<T, float>) {
      if (head_dim == Dp) {
        for (int i = 0; i < n; ++i) dst[i] = src[i];
        return;
      }
    }
    for (int i = 0; i < converted; ++i) {
      convert(src[i], buf + i * Dp);
      dst[i] = buf + i * Dp;
    }
    for (int i = converted; i < n; ++i) dst[i] = dst[0];
  }

  // Scores of a tile for one query head: kLanes dot products q . k[i], summed by one tree.
  VF scores(const float* qg, const float* const* krow) const {
    VF acc[kLanes];
    const VF q0 = vload(qg);
    for (int i = 0; i < kLanes; ++i) acc[i] = q0 * vload(krow[i]);
    for (int64_t c = 1; c < nv(); ++c) {
      const VF qc = vload(qg + c * kLanes);
      for (int i = 0; i < kLanes; ++i) acc[i] = fma(qc, vload(krow[i] + c * kLanes), acc[i]);
    }
    return reduce_add_transpose(acc);
  }

#if defined(__AVX512BF16__)
  // bf16 K with AVX512-BF16: vdpbf16ps multiplies bf16 pairs straight from the cache and adds them
  // in fp32 (the products are exact), so K is never converted. head_dim % 32 == 0.
  static VF scores_dpbf16(const bf16* qg, const bf16* const* krow, int64_t D) {
    __m512 acc[kLanes];
    for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 32) {
      const __m512bh qc = (__m512bh)_mm512_loadu_si512(qg + c);
      for (int i = 0; i < kLanes; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], qc, (__m512bh)_mm512_loadu_si512(krow[i] + c));
    }
    VF a[kLanes];
    for (int i = 0; i < kLanes; ++i) a[i].v = acc[i];
    return reduce_add_transpose(a);
  }
  static constexpr bool kHasDp = std::is_same_v<T, bf16>;
#else
  static constexpr bool kHasDp = false;
#endif

#if defined(__AVX512BF16__)
  // Pass 2 for bf16 V with AVX512-BF16 (head_dim % 32 == 0): each pair of tokens' V rows is woven
  // into (v[t][d], v[t+1][d]) bf16 pairs once per tile, shared by the group's query heads, and each
  // head multiplies them by its pair of probabilities rounded to bf16, summed in fp32 by vdpbf16ps
  // (the products are exact). Rounding the probabilities to the input dtype before the P.V product is
  // what torch's CPU flash attention does too; the normaliser l stays the fp32 sum. About half the
  // instructions of the fp32 path (each V row converted, one FMA per token and vector). Even dims come
  // out before odd ones in each 32, the order slot_of gives.
  void pass2_dpbf16(const WorkItem& w, Scratch& sc, const float* sbuf, int64_t stride, float* of) const {
    const int64_t D = head_dim, NV = nv(), Dp = NV * kLanes, G = group, len = w.t1 - w.t0;
    const int64_t* table = tables + w.s * max_blocks;
    int64_t bi = w.t0 / block_size, bo = w.t0 % block_size;
    const T* rp[kLanes];
    int32_t* woven = reinterpret_cast<int32_t*>(sc.vbuf.data());  // [kLanes / 2 pairs][NV][kLanes]
    int32_t pp[kLanes / 2];
    constexpr __mmask32 kHighWords = 0xAAAAAAAAu;
    constexpr int64_t CB = 8;
    for (int64_t t = 0; t < len; t += kLanes) {
      const int n = tile(table, w.h, w.t0 + t, w.t1, bi, bo, v_cache, rp);
      const int pairs = (n + 1) / 2;  // a missing second row repeats row 0, with probability 0
      for (int j = 0; j < pairs; ++j) {
        for (int64_t c = 0; c < D; c += 2 * kLanes) {
          const __m512i a = _mm512_loadu_si512(rp[2 * j] + c), b = _mm512_loadu_si512(rp[2 * j + 1] + c);
          int32_t* dst = woven + (j * NV + c / kLanes) * kLanes;
          _mm512_storeu_si512(dst, _mm512_mask_blend_epi16(kHighWords, a, _mm512_slli_epi32(b, 16)));
          _mm512_storeu_si512(dst + kLanes, _mm512_mask_blend_epi16(kHighWords, _mm512_srli_epi32(a, 16), b));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sbuf + g * stride + t)));
        float* og = of + g * Dp;
        for (int64_t c0 = 0; c0 < NV; c0 += CB) {
          const int64_t cn = std::min<int64_t>(CB, NV - c0);
          __m512 acc[CB];
          for (int64_t c = 0; c < cn; ++c) acc[c] = _mm512_loadu_ps(og + (c0 + c) * kLanes);
          for (int j = 0; j < pairs; ++j) {
            const __m512bh pj = (__m512bh)_mm512_set1_epi32(pp[j]);
            const int32_t* src = woven + (j * NV + c0) * kLanes;
            for (int64_t c = 0; c < cn; ++c)
              acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(src + c * kLanes), pj);
          }
          for (int64_t c = 0; c < cn; ++c) _mm512_storeu_ps(og + (c0 + c) * kLanes, acc[c]);
        }
      }
    }
  }
#endif

  // Row pointers of the n <= kLanes tokens from position t (bi, bo: t's block index and offset,
  // advanced past them). Missing rows repeat row 0.
  int tile(const int64_t* table, int64_t h, int64_t t, int64_t end, int64_t& bi, int64_t& bo, const T* base,
           const T** rp) const {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, end - t));
    for (int i = 0; i < n; ++i) {
      rp[i] = base + table[bi] * block_stride + bo * token_stride + h * head_dim;
      if (++bo == block_size) bo = 0, ++bi;
    }
    for (int i = n; i < kLanes; ++i) rp[i] = rp[0];
    return n;
  }

  // Two passes over the item's tokens: the scores of every query head (K read once), their max and
  // exps, then the exp-weighted sum of V (V read once). No running-max rescaling, no branches.
  void run(const WorkItem& w, Scratch& sc) const {
    const int64_t NV = nv(), Dp = NV * kLanes, D = head_dim, G = group;
    const int64_t* table = tables + w.s * max_blocks;
    const int64_t len = w.t1 - w.t0, stride = (len + kLanes - 1) / kLanes * kLanes;  // of sbuf rows
    float* qf = sc.q.data();
    float* of = sc.o.data();
    float* sbuf = sc.s.data();  // [G][stride]: scores, then their exps
    float* m = sc.m.data();
    float* l = sc.l.data();
    const T* qs = q + (w.s * num_heads + w.h * G) * D;
    std::fill(qf, qf + G * Dp, 0.f);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) qf[g * Dp + slot_of(d)] = to_float(qs[g * D + d]);
    const bool dp = kHasDp && D % 32 == 0;
    const VF vscale = vset1(scale);
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
    const T* rp[kLanes];
    const float* rows_f[kLanes];

    // Pass 1: scores (masked to -inf past the end) and their max per query head.
    VF* mx = sc.lv.data();
    for (int64_t g = 0; g < G; ++g) mx[g] = vset1(kNegInf);
    int64_t bi = w.t0 / block_size, bo = w.t0 % block_size;
    for (int64_t t = 0; t < len; t += kLanes) {
      const int n = tile(table, w.h, w.t0 + t, w.t1, bi, bo, k_cache, rp);
      // Blocks are scattered, so the hardware prefetchers cannot guess them: fetch the next tile's
      // K rows into L1, this tile's V rows (read in pass 2) into L2.
      for (int64_t i = 0, b2 = bi, o2 = bo; i < kLanes && w.t0 + t + kLanes + i < w.t1; ++i) {
        const char* row = reinterpret_cast<const char*>(k_cache + table[b2] * block_stride + o2 * token_stride + w.h * D);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
        if (++o2 == block_size) o2 = 0, ++b2;
      }
      for (int i = 0; i < n; ++i) {
        const char* row = reinterpret_cast<const char*>(v_cache + (rp[i] - k_cache));
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
      }
      if (!dp) rows(rp, kLanes, sc.kbuf.data(), rows_f, n);
      for (int64_t g = 0; g < G; ++g) {
        VF sv;
#if defined(__AVX512BF16__)
        if constexpr (kHasDp) {
          sv = dp ? scores_dpbf16(qs + g * D, rp, D) : scores(qf + g * Dp, rows_f);
        } else {
          sv = scores(qf + g * Dp, rows_f);
        }
#else
        sv = scores(qf + g * Dp, rows_f);
#endif
        sv = sv * vscale;
        if (n < kLanes) sv = keep_first(sv, n, kNegInf);
        mx[g] = vmax(mx[g], sv);
        vstore(sbuf + g * stride + t, sv);
      }
    }
    // exp(s - max) in place (exactly 0 where masked), and the sums.
    for (int64_t g = 0; g < G; ++g) {
      m[g] = reduce_max(mx[g]);
      const VF mv = vset1(m[g]);
      VF sum = vzero();
      float* sg = sbuf + g * stride;
      for (int64_t t = 0; t < len; t += kLanes) {
        const VF e = vexp(vload(sg + t) - mv);
        sum = sum + e;
        vstore(sg + t, e);
      }
      l[g] = reduce_add(sum);
    }

    // Pass 2: o[g] = sum_t p[g][t] * v[t], eight output vectors at a time in registers.
    std::fill(of, of + G * Dp, 0.f);
#if defined(__AVX512BF16__)
    if constexpr (kHasDp) {
      if (dp) {
        pass2_dpbf16(w, sc, sbuf, stride, of);
        return finish(w, of, m, l);
      }
    }
#endif
    bi = w.t0 / block_size, bo = w.t0 % block_size;
    constexpr int64_t CB = 8;
    for (int64_t t = 0; t < len; t += kLanes) {
      const int n = tile(table, w.h, w.t0 + t, w.t1, bi, bo, v_cache, rp);
      rows(rp, n, sc.vbuf.data(), rows_f, n);
      for (int64_t g = 0; g < G; ++g) {
        float* og = of + g * Dp;
        const float* pg = sbuf + g * stride + t;
        for (int64_t c0 = 0; c0 < NV; c0 += CB) {
          const int64_t cn = std::min<int64_t>(CB, NV - c0);
          VF acc[CB];
          for (int64_t c = 0; c < cn; ++c) acc[c] = vload(og + (c0 + c) * kLanes);
          for (int i = 0; i < n; ++i) {
            const VF pb = vset1(pg[i]);
            for (int64_t c = 0; c < cn; ++c) acc[c] = fma(pb, vload(rows_f[i] + (c0 + c) * kLanes), acc[c]);
          }
          for (int64_t c = 0; c < cn; ++c) vstore(og + (c0 + c) * kLanes, acc[c]);
        }
      }
    }

    finish(w, of, m, l);
  }

  // An item's result: the output itself, or (a partition of a split sequence) its partial result.
  void finish(const WorkItem& w, const float* of, const float* m, const float* l) const {
    const int64_t G = group, Dp = nv() * kLanes;
    if (w.slot < 0) {
      write_out(w.s, w.h, of, l);
    } else {
      for (int64_t g = 0; g < G; ++g) {
        part_ml[(w.slot * G + g) * 2] = m[g];
        part_ml[(w.slot * G + g) * 2 + 1] = l[g];
      }
      std::copy(of, of + G * Dp, part_o + w.slot * G * Dp);
    }
  }

  // out[s, h*G + g] = o[g] / l[g], back in order, rounded to T.
  void write_out(int64_t s, int64_t h, const float* of, const float* l) const {
    const int64_t Dp = nv() * kLanes, D = head_dim, G = group, e = split_end();
    T* os = out + (s * num_heads + h * G) * D;
    for (int64_t g = 0; g < G; ++g) {
      const VF inv = vset1(1.f / l[g]);
      const float* og = of + g * Dp;
      T* dst = os + g * D;
      if constexpr (kSplit<T>) {
        for (int64_t c = 0; c < e; c += kChunk) {
          VF lo, hi;
          interleave(vload(og + c), vload(og + c + kLanes), lo, hi);
          vstore(dst + c, lo * inv);
          vstore(dst + c + kLanes, hi * inv);
        }
      }
      int64_t c = e;
      for (; c + kLanes <= D; c += kLanes) vstore(dst + c, vload(og + c) * inv);
      if (c < D) vstore_n(dst + c, vload(og + c) * inv, static_cast<int>(D - c));
    }
  }

  // The partitions first..first+parts of (s, h), merged by log-sum-exp.
  void merge(int64_t s, int64_t h, int64_t first, int64_t parts, Scratch& sc) const {
    const int64_t Dp = nv() * kLanes, G = group;
    float* of = sc.o.data();
    float* l = sc.l.data();
    std::fill(of, of + G * Dp, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      float mx = kNegInf;
      for (int64_t j = 0; j < parts; ++j) mx = std::max(mx, part_ml[((first + j) * G + g) * 2]);
      float sum = 0.f;
      float* og = of + g * Dp;
      for (int64_t j = 0; j < parts; ++j) {
        const float wgt = sleef_expf(part_ml[((first + j) * G + g) * 2] - mx);
        sum += wgt * part_ml[((first + j) * G + g) * 2 + 1];
        const float* src = part_o + ((first + j) * G + g) * Dp;
        const VF wv = vset1(wgt);
        for (int64_t c = 0; c < nv(); ++c) vstore(og + c * kLanes, fma(wv, vload(src + c * kLanes), vload(og + c * kLanes)));
      }
      l[g] = sum;
    }
    write_out(s, h, of, l);
  }
};

template <typename T, int NVC>
void decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& lens, double scale) {
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t NV = (D + kLanes - 1) / kLanes, Dp = NV * kLanes;
  const int64_t* len = lens.data_ptr<int64_t>();

  // Partition length: about four items per thread over the whole batch, never below kMinPartition,
  // never above what keeps an item's scores within 32 KiB.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) total += len[s] * Hkv;
  const int64_t max_part = std::max<int64_t>(kMinPartition, 8192 / G) / kLanes * kLanes;
  int64_t part_len = std::max<int64_t>(kMinPartition, (total + 4 * threads - 1) / (4 * threads));
  part_len = std::min(max_part, (part_len + kLanes - 1) / kLanes * kLanes);

  std::vector<WorkItem> items;
  struct Split {
    int64_t s, h, first, parts;
  };
  std::vector<Split> splits;
  int64_t slots = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t parts = (len[s] + part_len - 1) / part_len;
    for (int64_t h = 0; h < Hkv; ++h) {
      if (parts == 1) {
        items.push_back({s, h, 0, len[s], -1});
        continue;
      }
      const int64_t step = ((len[s] + parts - 1) / parts + kLanes - 1) / kLanes * kLanes;
      splits.push_back({s, h, slots, 0});
      for (int64_t t0 = 0; t0 < len[s]; t0 += step) {
        items.push_back({s, h, t0, std::min(len[s], t0 + step), slots++});
        ++splits.back().parts;
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.t1 - a.t0 > b.t1 - b.t0; });
  std::vector<float> part_ml(slots * G * 2), part_o(slots * G * Dp);

  Decode<T, NVC> k{out.data_ptr<T>(), q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                   tables.data_ptr<int64_t>(), Hq, G, block_size, tables.size(1), D, NV,
                   Hkv * D, block_size * Hkv * D, static_cast<float>(scale), part_ml.data(), part_o.data()};
  auto scratch = [&] {
    Scratch sc;
    sc.q.resize(G * Dp);
    sc.o.resize(G * Dp);
    sc.kbuf.resize(kLanes * Dp);
    sc.vbuf.resize(kLanes * Dp);
    sc.s.resize(G * max_part);
    sc.m.resize(G);
    sc.l.resize(G);
    sc.lv.resize(G);
    return sc;
  };
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min(threads, n_items);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch sc = scratch();
    for (int64_t wkr = begin; wkr < end; ++wkr)
      for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) k.run(items[i], sc);
  });
  if (!splits.empty()) {
    at::parallel_for(0, static_cast<int64_t>(splits.size()), 1, [&](int64_t begin, int64_t end) {
      Scratch sc = scratch();
      for (int64_t i = begin; i < end; ++i) k.merge(splits[i].s, splits[i].h, splits[i].first, splits[i].parts, sc);
    });
  }
}

template <typename T>
void decode_dispatch(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& tables, const torch::Tensor& lens,
                     double scale) {
  // The common head sizes get a compile-time vector count (fully unrolled inner loops).
  switch (q.size(2)) {
    case 64:
      return decode<T, 64 / kLanes>(out, q, k_cache, v_cache, tables, lens, scale);
    case 128:
      return decode<T, 128 / kLanes>(out, q, k_cache, v_cache, tables, lens, scale);
    default:
      return decode<T, 0>(out, q, k_cache, v_cache, tables, lens, scale);
  }
}

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  constexpr const char* fn = "paged_decode_attention: ";
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                {&block_tables, "block_tables"}, {&seq_lens, "seq_lens"}})
    TORCH_CHECK(t->device().is_cpu(), fn, name, " must be a CPU tensor, got one on ", t->device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, fn,
              "q must be float32, bfloat16 or float16, got ", dtype);
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    TORCH_CHECK(t->scalar_type() == dtype, fn, name, " is ", t->scalar_type(), " but q is ", dtype,
                " (q, out and the K/V cache must share one dtype)");
  TORCH_CHECK(q.dim() == 3, fn, "q must be [num_seqs, num_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), fn, "out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, fn, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), fn, "v_cache ", v_cache.sizes(), " must have k_cache's shape ",
              k_cache.sizes());
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    TORCH_CHECK(t->is_contiguous(), fn, name, " must be contiguous");
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, fn, "head_dim differs: q has ", D, ", the cache ", k_cache.size(3));
  TORCH_CHECK(D > 0 && block_size > 0, fn, "empty head_dim or block_size");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, fn, "the ", Hq, " query heads are not a multiple of the ", Hkv, " KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == S, fn,
              "block_tables must be int64 [num_seqs=", S, ", max_blocks], got ", block_tables.scalar_type(), " ",
              block_tables.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.dim() == 1 && seq_lens.size(0) == S, fn,
              "seq_lens must be int64 [num_seqs=", S, "], got ", seq_lens.scalar_type(), " ", seq_lens.sizes());
  if (S == 0) return;
  const torch::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= max_blocks * block_size, fn, "seq_lens[", s, "] = ", lp[s],
                " is outside [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    for (int64_t b = 0; b < (lp[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tp[s * max_blocks + b] >= 0 && tp[s * max_blocks + b] < num_blocks, fn, "block_tables[", s, "][", b,
                  "] = ", tp[s * max_blocks + b], " is not a block of the cache (num_blocks = ", num_blocks, ")");
  }
  switch (dtype) {
    case at::kFloat:
      return decode_dispatch<float>(out, q, k_cache, v_cache, tables, lens, scale);
    case at::kBFloat16:
      return decode_dispatch<bf16>(out, q, k_cache, v_cache, tables, lens, scale);
    default:
      return decode_dispatch<f16>(out, q, k_cache, v_cache, tables, lens, scale);
  }
}

}  // namespace tcpu
