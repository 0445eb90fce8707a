// Software prefetch for the kernels that stream packed weights from memory once per call (the bit-plane
// products at decode, where every token reads every weight).
//
// Why: the hardware prefetchers do not follow AVX-512 masked loads (vmovdqu8 with a mask, which the
// bit-plane kernels use so that a tile's last pair never reads past the buffer). On the 2-core Zen 5 EPYC,
// one core ran the int8-activation GEMV over 4-bit planes not in cache at 7 GB/s with them, 27 GB/s with
// plain loads and 55 GB/s with masked loads and this prefetch 12 KiB ahead (about three tiles of a
// 576-wide layer; 2, 4, 8, 16 and 32 KiB were tried: docs/benchmarks.md). Prefetches never fault, so
// reading ahead past a thread's range or the buffer's end is harmless.
#pragma once

#include <cstdint>

namespace tcpu {

constexpr int64_t kPrefetchAhead = 12288;

// The `lines` cache lines at p + kPrefetchAhead, into all cache levels.
inline void prefetch_ahead(const uint8_t* p, int lines = 1) {
  for (int i = 0; i < lines; ++i) __builtin_prefetch(p + kPrefetchAhead + 64 * i, 0, 3);
}

}  // namespace tcpu
