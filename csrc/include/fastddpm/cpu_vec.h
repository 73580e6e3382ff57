// at::vec for the CPU kernels, with the instruction set this build targets.
// setup.py compiles the CPU sources once per CPU build (baseline x86-64, AVX2, AVX-512;
// one build with FASTDDPM_CPU_FLAGS when set), each with its own -m flags, and this
// header tells ATen's vector headers which implementation those flags allow.
#pragma once

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "fastddpm/elementwise.h"

namespace fastddpm {

using Vec = at::vec::Vectorized<float>;

// Blocks of kBlock elements are converted to the compute type A (float, or double for
// float64 kernels) in stack buffers, computed with at::vec, and converted back; tensors
// already of type A are used in place.
constexpr int64_t kBlock = 1024;

template <typename T, typename A = float>
struct ComputeBlock {
  static const A* load(const T* src, A* buf, int64_t n) {
    if constexpr (std::is_same_v<T, A>) {
      return src;
    } else {
      at::vec::convert(src, buf, n);
      return buf;
    }
  }
  static A* out(T* dst, A* buf) {
    if constexpr (std::is_same_v<T, A>) {
      return dst;
    } else {
      return buf;
    }
  }
  static void store(T* dst, const A* buf, int64_t n) {
    if constexpr (!std::is_same_v<T, A>) at::vec::convert(buf, dst, n);
  }
};

template <typename T>
using FloatBlock = ComputeBlock<T, float>;

// elementwise.h's formulas on vectors: the CPU kernels instantiate them with V = Vec.
template <>
struct ValueOps<Vec> {
  static Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
  static Vec clamp(const Vec& x, const Vec& lo, const Vec& hi) { return at::vec::clamp(x, lo, hi); }
  static Vec sqrt(const Vec& x) { return x.sqrt(); }
  static Vec exp(const Vec& x) { return x.exp(); }
};

// f(b, i, n) for the blocks [i, i + n) of at most kBlock elements of a batch-major tensor of B samples of M
// elements, in parallel over the flattened batch (a batch of one still uses every core); no block crosses
// into another sample, so f computes sample b's coefficients once per block.
template <typename F>
inline void for_each_sample_block(int64_t B, int64_t M, int64_t grain, const F& f) {
  at::parallel_for(0, B * M, grain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      while (i < seg_end) {
        const int64_t n = std::min(kBlock, seg_end - i);
        f(b, i, n);
        i += n;
      }
    }
  });
}

// f(j, r) for the vectors of [0, n): r = Vec::size() lanes, then the tail's n - j (f loads and stores with
// Vec::loadu(p, r) / store(p, r), so the tail runs the same vector code on a partial load).
template <typename F>
inline void for_each_vec(int64_t n, const F& f) {
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, W);
  if (j < n) f(j, n - j);
}

// The sum of a vector's lanes, returned in double for the caller's accumulation.
template <typename A>
inline double hsum(const at::vec::Vectorized<A>& v) {
  using V = at::vec::Vectorized<A>;
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, v);
}

}  // namespace fastddpm
