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

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

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

// The sum of a vector's lanes, returned in double for the caller's accumulation.
template <typename A>
inline double hsum(const at::vec::Vectorized<A>& v) {
  using V = at::vec::Vectorized<A>;
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, v);
}

}  // namespace fastddpm
