// Device helpers for the CUDA kernels. Torch-free, so .cu files stay quick to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sample b's timesteps clamped into a table of T values, t into [0, T) and prev_t below t (any
// negative prev_t is the end of the chain): the host checks the values only where they live on it
// (reading a GPU tensor's would cost a sync), so a bad index here never reads outside the table.
__device__ __forceinline__ void clamp_step_timesteps(int64_t& tb, int64_t& pb, int64_t T) {
  tb = tb < 0 ? 0 : (tb >= T ? T - 1 : tb);
  pb = pb >= tb ? tb - 1 : pb;
}

// The Philox counter offset of a launch: the stream's offset plus, where given, the device int64 it
// points to (read on the device, so a CUDA graph replays the step with a new offset).
__device__ __forceinline__ uint64_t philox_counter_offset(const PhiloxStream& s) {
  return s.offset + (s.offset_ptr != nullptr ? static_cast<uint64_t>(__ldg(s.offset_ptr)) : 0u);
}

// The grid-stride loop of the reverse-step kernels over n elements, samples of M elements each: body(i, c)
// for every element i of this thread, c = coeffs_of(b, t_b, prev_t_b) the coefficients of its sample b
// (timesteps clamped by clamp_step_timesteps), computed again only where i crosses into another sample.
template <typename Coeffs, typename CoeffsOf, typename Body>
__device__ __forceinline__ void for_each_step_element(int64_t n, int64_t M, int64_t T, const int64_t* t,
                                                      const int64_t* prev_t, CoeffsOf coeffs_of, Body body) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t cur_b = -1;
  Coeffs c{};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t b = i / M;
    if (b != cur_b) {
      int64_t tb = t[b], pb = prev_t[b];
      clamp_step_timesteps(tb, pb, T);
      c = coeffs_of(b, tb, pb);
      cur_b = b;
    }
    body(i, c);
  }
}

// Threads per block of the one-pass elementwise kernels (grid_for gives the blocks).
constexpr int kElementwiseThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill any current GPU,
// bounded so the grid stays legal.
inline int grid_for(int64_t n, int threads, int per_thread = 4) {
  int64_t blocks = (n + static_cast<int64_t>(threads) * per_thread - 1) / (static_cast<int64_t>(threads) * per_thread);
  if (blocks < 1) blocks = 1;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  return static_cast<int>(blocks);
}

}  // namespace cuda
}  // namespace fastddpm

// Inside a launcher (which returns its cudaError_t as an int): read the launch error right after each
// launch, so that a launcher of several kernels returns the first failing one's and never runs the rest
// on a failed launch's (unwritten) outputs. The caller has consumed any earlier error first
// (check_no_pending_error in cuda_host.h), so what is read here is this launch's.
#define FASTDDPM_RETURN_IF_LAUNCH_FAILED()                  \
  do {                                                      \
    const cudaError_t fastddpm_launch_err = cudaGetLastError(); \
    if (fastddpm_launch_err != cudaSuccess) return static_cast<int>(fastddpm_launch_err); \
  } while (0)

// Dispatch on DType with `scalar_t` bound in the body.
#define FASTDDPM_CUDA_DISPATCH(dt, ...)                                  \
  do {                                                                   \
    switch (dt) {                                                        \
      case ::fastddpm::cuda::DType::kFloat: {                            \
        using scalar_t = float;                                          \
        __VA_ARGS__;                                                     \
        break;                                                           \
      }                                                                  \
      case ::fastddpm::cuda::DType::kHalf: {                             \
        using scalar_t = __half;                                         \
        __VA_ARGS__;                                                     \
        break;                                                           \
      }                                                                  \
      case ::fastddpm::cuda::DType::kBFloat16: {                         \
        using scalar_t = __nv_bfloat16;                                  \
        __VA_ARGS__;                                                     \
        break;                                                           \
      }                                                                  \
    }                                                                    \
  } while (0)
