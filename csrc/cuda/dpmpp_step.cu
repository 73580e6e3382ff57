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
  const StepOperands& s = a.s;
  auto coeffs_of = [=](int64_t b, int64_t tb, int64_t pb) {
    int64_t lb = p != nullptr ? a.last_t[b] : tb;
    lb = lb <= tb ? tb : (lb >= s.T ? s.T - 1 : lb);
    const float* ac = s.alphas_cumprod;
    return dpmpp_step_coeffs(__ldg(ac + tb), pb >= 0 ? __ldg(ac + pb) : 1.0f, __ldg(ac + lb), pb < 0,
                             p != nullptr && lb > tb);
  };
  for_each_step_element<DpmppCoeffs>(s.B * s.M, s.M, s.T, s.t, s.prev_t, coeffs_of,
                                     [=](int64_t i, const DpmppCoeffs& c) {
                                       const float xv = to_float(x[i]);
                                       const float x0 = dpmpp_x0(xv, to_float(m[i]), c, a.prediction_type,
                                                                 a.clip_range);
                                       if (pred != nullptr) pred[i] = from_float<T>(x0);
                                       out[i] = from_float<T>(
                                           dpmpp_update(xv, x0, p != nullptr ? to_float(p[i]) : 0.0f, c));
                                     });
}

}  // namespace

int launch_dpmpp_step(const DpmppStepParams& a, cudaStream_t stream) {
  const StepOperands& s = a.s;
  const int64_t n = s.B * s.M;
  if (n == 0) return 0;
  FASTDDPM_CUDA_DISPATCH(
      s.dtype, dpmpp_step_kernel<scalar_t><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
                   static_cast<const scalar_t*>(s.x), static_cast<const scalar_t*>(s.m),
                   static_cast<const scalar_t*>(a.p), static_cast<scalar_t*>(s.out), static_cast<scalar_t*>(s.pred),
                   a));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
