// ddim_step on CUDA: one pass; per-sample coefficients recomputed only when a thread's
// element crosses into another sample; Philox noise generated in registers. The
// per-element math is ddim_step_coeffs / ddim_mean (elementwise.h), shared with the CPU.
#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {
namespace {

// The scalars of DdimStepParams, passed by value (the tensors go as typed pointers).
struct DdimArgs {
  int64_t T, n, M;
  PhiloxStream philox;
  int64_t noise_mode, prediction_type;
  float final_ac, eta, clip_range;
  bool use_clipped, diffusers_beta;
};

template <typename T>
__global__ void ddim_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ z,
                                 T* __restrict__ out, T* __restrict__ pred, const int64_t* __restrict__ t,
                                 const int64_t* __restrict__ prev_t, const float* __restrict__ ac, DdimArgs a) {
  const uint64_t offset = philox_counter_offset(a.philox);
  auto coeffs_of = [=](int64_t, int64_t tb, int64_t pb) {
    const float ab_t = __ldg(ac + tb);
    const float ab_prev = pb >= 0 ? __ldg(ac + pb) : a.final_ac;
    return ddim_step_coeffs(ab_t, ab_prev, a.eta, a.diffusers_beta);
  };
  for_each_step_element<DdimCoeffs>(a.n, a.M, a.T, t, prev_t, coeffs_of, [=](int64_t i, const DdimCoeffs& c) {
    float x0;
    float o = ddim_mean(to_float(x[i]), to_float(m[i]), c, a.prediction_type, a.clip_range, a.use_clipped, &x0);
    if (pred != nullptr) pred[i] = from_float<T>(x0);
    if (a.noise_mode == kNoiseTensor) {
      o += c.std * to_float(z[i]);
    } else if (a.noise_mode == kNoisePhilox) {
      o += c.std * philox_normal(a.philox.seed, offset + static_cast<uint64_t>(i));
    }
    out[i] = from_float<T>(o);
  });
}

}  // namespace

int launch_ddim_step(const DdimStepParams& p, cudaStream_t stream) {
  const StepOperands& s = p.s;
  const int64_t n = s.B * s.M;
  if (n == 0) return 0;
  const DdimArgs a{s.T, n, s.M, p.philox, p.noise_mode, p.prediction_type,
                   p.final_alpha_cumprod, p.eta, p.clip_range, p.use_clipped_model_output, p.diffusers_beta};
  FASTDDPM_CUDA_DISPATCH(
      s.dtype, ddim_step_kernel<scalar_t><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
                   static_cast<const scalar_t*>(s.x), static_cast<const scalar_t*>(s.m),
                   static_cast<const scalar_t*>(p.z), static_cast<scalar_t*>(s.out), static_cast<scalar_t*>(s.pred),
                   s.t, s.prev_t, s.alphas_cumprod, a));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
