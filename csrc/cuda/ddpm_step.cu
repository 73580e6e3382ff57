// ddpm_step on CUDA: one pass; coefficients recomputed only when a thread's
// element crosses into another sample; Philox noise generated in registers.
#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {
namespace {

struct Args {
  int64_t T, n, M;
  uint64_t seed, offset;
  int64_t noise_mode, prediction_type, variance_type;
  float clip_range;
  bool diffusers_beta;
};

template <typename T>
__global__ void ddpm_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ z,
                                 const T* __restrict__ pv, T* __restrict__ out, T* __restrict__ pred,
                                 const int64_t* __restrict__ t, const int64_t* __restrict__ prev_t,
                                 const float* __restrict__ ac, const int64_t* __restrict__ offset_ptr, Args a) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  // The counter offset read on the device (when given), so a CUDA graph replays the step with a new one.
  const uint64_t offset = a.offset + (offset_ptr != nullptr ? static_cast<uint64_t>(__ldg(offset_ptr)) : 0u);
  int64_t cur_b = -1;
  StepCoeffs c{};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.n; i += stride) {
    const int64_t b = i / a.M;
    if (b != cur_b) {
      int64_t tb = t[b], pb = prev_t[b];
      tb = tb < 0 ? 0 : (tb >= a.T ? a.T - 1 : tb);
      pb = pb >= tb ? tb - 1 : pb;
      const float ab_t = __ldg(ac + tb);
      const float ab_prev = pb >= 0 ? __ldg(ac + pb) : 1.0f;
      c = ddpm_step_coeffs(ab_t, ab_prev, a.variance_type, tb > 0, a.diffusers_beta);
      cur_b = b;
    }
    const float xv = to_float(x[i]);
    const float x0 = ddpm_pred_x0(xv, to_float(m[i]), c, a.prediction_type, a.clip_range);
    if (pred != nullptr) pred[i] = from_float<T>(x0);
    float zv = 0.0f, sigma = 0.0f;
    if (c.add_noise && a.noise_mode != kNoNoise) {
      zv = a.noise_mode == kNoiseTensor ? to_float(z[i]) : philox_normal(a.seed, offset + static_cast<uint64_t>(i));
      sigma = ddpm_sigma(c, a.variance_type, pv != nullptr ? to_float(pv[i]) : 0.0f);
    }
    StepCoeffs cc = c;
    cc.add_noise = c.add_noise && a.noise_mode != kNoNoise;
    out[i] = from_float<T>(ddpm_prev_sample(xv, x0, sigma, zv, cc));
  }
}

__global__ void philox_normal_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    out[i] = philox_normal(seed, offset + static_cast<uint64_t>(i));
  }
}

}  // namespace

int launch_ddpm_step(int dtype, const void* x, const void* m, const void* z, const void* pv, void* out,
                     void* pred, const int64_t* t, const int64_t* prev_t, const float* alphas_cumprod,
                     int64_t T, int64_t B, int64_t M, uint64_t seed, uint64_t offset, const int64_t* offset_ptr,
                     int64_t noise_mode, int64_t prediction_type, int64_t variance_type, float clip_range,
                     bool diffusers_beta, cudaStream_t stream) {
  const int64_t n = B * M;
  if (n == 0) return 0;
  const Args a{T, n, M, seed, offset, noise_mode, prediction_type, variance_type, clip_range, diffusers_beta};
  constexpr int kThreads = 256;
  const int blocks = grid_for(n, kThreads);
  FASTDDPM_CUDA_DISPATCH(static_cast<DType>(dtype), ddpm_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(m), static_cast<const scalar_t*>(z),
      static_cast<const scalar_t*>(pv), static_cast<scalar_t*>(out), static_cast<scalar_t*>(pred), t, prev_t,
      alphas_cumprod, noise_mode == kNoisePhilox ? offset_ptr : nullptr, a));
  return static_cast<int>(cudaGetLastError());
}

int launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  philox_normal_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(out, n, seed, offset);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
