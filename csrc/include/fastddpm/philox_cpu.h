// A block of Philox normals on the CPU: the integer rounds in a plain loop
// (auto-vectorised), the Box-Muller transform with at::vec (Sleef log and cos).
// Same numbers as philox_normal() in elementwise.h up to the rounding of log/cos.
#pragma once

#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {

inline void philox_normal_block(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  alignas(64) float u2[kBlock];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t ctr = offset + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    const float a = uint_to_uniform(c0);
    out[j] = a > 1.0e-7f ? a : 1.0e-7f;
    u2[j] = uint_to_uniform(c1);
  }
  const Vec two_pi(6.283185307179586f), minus_two(-2.0f);
  at::vec::map2([=](Vec u1v, Vec u2v) { return (minus_two * u1v.log()).sqrt() * (two_pi * u2v).cos(); },
                out, out, u2, n);
}

}  // namespace fastddpm
