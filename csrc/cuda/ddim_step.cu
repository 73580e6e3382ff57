// ddim_step on CUDA: one pass; per-sample coefficients recomputed only when a thread's
// element crosses into another sample; Philox noise generated in registers. The
// per-element math is ddim_step_coeffs / ddim_mean (elementwise.h), shared with the CPU.
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {

int launch_ddim_step(int dtype, const void* x, const void* m, const void* z, void* out, void* pred,
                     const int64_t* t, const int64_t* prev_t, const float* alphas_cumprod, int64_t T,
                     int64_t B, int64_t M, float final_alpha_cumprod, uint64_t seed, uint64_t offset,
                     const int64_t* offset_ptr, int64_t noise_mode, int64_t prediction_type, float eta,
                     float clip_range, bool use_clipped, bool diffusers_beta, cudaStream_t stream);

namespace {

struct DdimArgs {
  int64_t T, n, M;
  uint64_t seed, offset;
  int64_t noise_mode, prediction_type;
  float final_ac, eta, clip_range;
  bool use_clipped, diffusers_beta;
};

template <typename T>
__global__ void ddim_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ z,
                                 T* __restrict__ out, T* __restrict__ pred, const int64_t* __restrict__ t,
                                 const int64_t* __restrict__ prev_t, const float* __restrict__ ac,
                                 const int64_t* __restrict__ offset_ptr, DdimArgs a) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  // The counter offset read on the device (when given), so a CUDA graph replays the step with a new one.
  const uint64_t offset = a.offset + (offset_ptr != nullptr ? static_cast<uint64_t>(__ldg(offset_ptr)) : 0u);
  int64_t cur_b = -1;
  DdimCoeffs c{};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.n; i += stride) {
    const int64_t b = i / a.M;
    if (b != cur_b) {
      int64_t tb = t[b], pb = prev_t[b];
      tb = tb < 0 ? 0 : (tb >= a.T ? a.T - 1 : tb);
      pb = pb >= tb ? tb - 1 : pb;
      const float ab_t = __ldg(ac + tb);
      const float ab_prev = pb >= 0 ? __ldg(ac + pb) : a.final_ac;
      c = ddim_step_coeffs(ab_t, ab_prev, a.eta, a.diffusers_beta);
      cur_b = b;
    }
    float x0;
    float o = ddim_mean(to_float(x[i]), to_float(m[i]), c, a.prediction_type, a.clip_range, a.use_clipped, &x0);
    if (pred != nullptr) pred[i] = from_float<T>(x0);
    if (a.noise_mode == kNoiseTensor) {
      o += c.std * to_float(z[i]);
    } else if (a.noise_mode == kNoisePhilox) {
      o += c.std * philox_normal(a.seed, offset + static_cast<uint64_t>(i));
    }
    out[i] = from_float<T>(o);
  }
}

}  // namespace

int launch_ddim_step(int dtype, const void* x, const void* m, const void* z, void* out, void* pred,
                     const int64_t* t, const int64_t* prev_t, const float* alphas_cumprod, int64_t T,
                     int64_t B, int64_t M, float final_alpha_cumprod, uint64_t seed, uint64_t offset,
                     const int64_t* offset_ptr, int64_t noise_mode, int64_t prediction_type, float eta,
                     float clip_range, bool use_clipped, bool diffusers_beta, cudaStream_t stream) {
  const int64_t n = B * M;
  if (n == 0) return 0;
  const DdimArgs a{T, n, M, seed, offset, noise_mode, prediction_type, final_alpha_cumprod, eta, clip_range,
                   use_clipped, diffusers_beta};
  constexpr int kThreads = 256;
  const int blocks = grid_for(n, kThreads);
  FASTDDPM_CUDA_DISPATCH(static_cast<DType>(dtype), ddim_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(m), static_cast<const scalar_t*>(z),
      static_cast<scalar_t*>(out), static_cast<scalar_t*>(pred), t, prev_t, alphas_cumprod,
      noise_mode == kNoisePhilox ? offset_ptr : nullptr, a));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
