// dpmpp_step on CUDA: one pass; per-sample coefficients recomputed only when a thread's element crosses
// into another sample. The per-element math is dpmpp_step_coeffs / dpmpp_x0 / dpmpp_update
// (dpmpp_step.h), shared with the CPU kernel.
#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/dpmpp_step.h"

namespace fastddpm {
namespace cuda {
namespace {

template <typename T>
__global__ void dpmpp_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ p,
                                  T* __restrict__ out, T* __restrict__ pred, DpmppStepParams a) {
  const int64_t n = a.B * a.M;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t cur_b = -1;
  DpmppCoeffs c{};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t b = i / a.M;
    if (b != cur_b) {
      // The host checked the timesteps; clamping keeps a bad index from reading out of bounds.
      int64_t tb = a.t[b], pb = a.prev_t[b];
      clamp_step_timesteps(tb, pb, a.T);
      int64_t lb = p != nullptr ? a.last_t[b] : tb;
      lb = lb <= tb ? tb : (lb >= a.T ? a.T - 1 : lb);
      const float* ac = a.alphas_cumprod;
      c = dpmpp_step_coeffs(__ldg(ac + tb), pb >= 0 ? __ldg(ac + pb) : 1.0f, __ldg(ac + lb), pb < 0,
                            p != nullptr && lb > tb);
      cur_b = b;
    }
    const float xv = to_float(x[i]);
    const float x0 = dpmpp_x0(xv, to_float(m[i]), c, a.prediction_type, a.clip_range);
    if (pred != nullptr) pred[i] = from_float<T>(x0);
    out[i] = from_float<T>(dpmpp_update(xv, x0, p != nullptr ? to_float(p[i]) : 0.0f, c));
  }
}

}  // namespace

int launch_dpmpp_step(const DpmppStepParams& a, cudaStream_t stream) {
  const int64_t n = a.B * a.M;
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  const int blocks = grid_for(n, kThreads);
  FASTDDPM_CUDA_DISPATCH(a.dtype, dpmpp_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.m), static_cast<const scalar_t*>(a.p),
      static_cast<scalar_t*>(a.out), static_cast<scalar_t*>(a.pred), a));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
