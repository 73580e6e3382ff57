// A block of Philox normals on the CPU. The ten integer rounds run lane-wise over
// arrays of kLanes counters, a shape the compiler vectorises (32x32->64-bit
// multiplies map to vpmuludq); the Box-Muller transform uses at::vec (Sleef log and
// cos). Same numbers as philox_normal() in elementwise.h up to the rounding of log/cos.
#pragma once

#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {

namespace detail {
constexpr int64_t kLanes = 64;

// Words c0, c1 of counters offset .. offset + n - 1 (n <= kLanes), as Triton's uniforms.
inline void philox_uniform_pairs(uint64_t seed, uint64_t offset, int64_t n, float* u1, float* u2) {
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    const uint64_t ctr = offset + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(ctr);
    c1[j] = static_cast<uint32_t>(ctr >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
#pragma GCC ivdep
    for (int64_t j = 0; j < kLanes; ++j) {
      const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2[j];
      const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0[j];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(pb);
      c3[j] = static_cast<uint32_t>(pa);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float a = uint_to_uniform(c0[j]);
    u1[j] = a > 1.0e-7f ? a : 1.0e-7f;
    u2[j] = uint_to_uniform(c1[j]);
  }
}
}  // namespace detail

inline void philox_normal_block(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  alignas(64) float u2[kBlock];
  for (int64_t j = 0; j < n; j += detail::kLanes) {
    detail::philox_uniform_pairs(seed, offset + static_cast<uint64_t>(j), std::min(detail::kLanes, n - j),
                                 out + j, u2 + j);
  }
  const Vec two_pi(6.283185307179586f), minus_two(-2.0f);
  at::vec::map2([=](Vec u1v, Vec u2v) { return (minus_two * u1v.log()).sqrt() * (two_pi * u2v).cos(); },
                out, out, u2, n);
}

}  // namespace fastddpm
