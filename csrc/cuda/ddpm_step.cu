// ddpm_step on CUDA: one pass; coefficients recomputed only when a thread's
// element crosses into another sample; Philox noise generated in registers.
#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {
namespace {

// The scalars of DdpmStepParams, passed by value (the tensors go as typed pointers).
struct Args {
  int64_t T, n, M;
  PhiloxStream philox;
  int64_t noise_mode, prediction_type, variance_type;
  float clip_range;
  bool diffusers_beta;
};

template <typename T>
__global__ void ddpm_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ z,
                                 const T* __restrict__ pv, T* __restrict__ out, T* __restrict__ pred,
                                 const int64_t* __restrict__ t, const int64_t* __restrict__ prev_t,
                                 const float* __restrict__ ac, Args a) {
  const uint64_t offset = philox_counter_offset(a.philox);
  auto coeffs_of = [=](int64_t, int64_t tb, int64_t pb) {
    const float ab_t = __ldg(ac + tb);
    const float ab_prev = pb >= 0 ? __ldg(ac + pb) : 1.0f;
    return ddpm_step_coeffs(ab_t, ab_prev, a.variance_type, tb > 0, a.diffusers_beta);
  };
  for_each_step_element<StepCoeffs>(a.n, a.M, a.T, t, prev_t, coeffs_of, [=](int64_t i, const StepCoeffs& c) {
    const float xv = to_float(x[i]);
    const float x0 = ddpm_pred_x0(xv, to_float(m[i]), c, a.prediction_type, a.clip_range);
    if (pred != nullptr) pred[i] = from_float<T>(x0);
    float zv = 0.0f, sigma = 0.0f;
    if (c.add_noise && a.noise_mode != kNoNoise) {
      zv = a.noise_mode == kNoiseTensor ? to_float(z[i]) : philox_normal(a.philox.seed, offset + static_cast<uint64_t>(i));
      sigma = ddpm_sigma(c, a.variance_type, pv != nullptr ? to_float(pv[i]) : 0.0f);
    }
    StepCoeffs cc = c;
    cc.add_noise = c.add_noise && a.noise_mode != kNoNoise;
    out[i] = from_float<T>(ddpm_prev_sample(xv, x0, sigma, zv, cc));
  });
}

__global__ void philox_normal_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    out[i] = philox_normal(seed, offset + static_cast<uint64_t>(i));
  }
}

}  // namespace

int launch_ddpm_step(const DdpmStepParams& p, cudaStream_t stream) {
  const StepOperands& s = p.s;
  const int64_t n = s.B * s.M;
  if (n == 0) return 0;
  const Args a{s.T, n, s.M, p.philox, p.noise_mode, p.prediction_type, p.variance_type,
               p.clip_range, p.diffusers_beta};
  FASTDDPM_CUDA_DISPATCH(
      s.dtype, ddpm_step_kernel<scalar_t><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
                   static_cast<const scalar_t*>(s.x), static_cast<const scalar_t*>(s.m),
                   static_cast<const scalar_t*>(p.z), static_cast<const scalar_t*>(p.pv),
                   static_cast<scalar_t*>(s.out), static_cast<scalar_t*>(s.pred), s.t, s.prev_t, s.alphas_cumprod, a));
  return static_cast<int>(cudaGetLastError());
}

int launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (n == 0) return 0;
  philox_normal_kernel<<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(out, n, seed, offset);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
