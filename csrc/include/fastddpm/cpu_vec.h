// at::vec for the CPU kernels, with the instruction set this build targets.
// setup.py compiles the CPU sources with -march=native by default (a source build
// runs where it is built; FASTDDPM_CPU_FLAGS overrides), and this header tells
// ATen's vector headers which implementation to use.
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

namespace fastddpm {

using Vec = at::vec::Vectorized<float>;

// Blocks of kBlock elements are converted to float in stack buffers, computed
// with Vec, and converted back; fp32 tensors are used in place.
constexpr int64_t kBlock = 1024;

template <typename T>
struct FloatBlock {
  static const float* load(const T* src, float* buf, int64_t n) {
    at::vec::convert(src, buf, n);
    return buf;
  }
  static float* out(T* /*dst*/, float* buf) { return buf; }
  static void store(T* dst, const float* buf, int64_t n) { at::vec::convert(buf, dst, n); }
};

template <>
struct FloatBlock<float> {
  static const float* load(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }
  static float* out(float* dst, float* /*buf*/) { return dst; }
  static void store(float* /*dst*/, const float* /*buf*/, int64_t /*n*/) {}
};

}  // namespace fastddpm
