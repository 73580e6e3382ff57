// ddim_step on the CPU: predicted x0 and eps, optional clip, the DDIM update and
// sigma z in one pass (Song et al. 2021, eq. 12, as diffusers' DDIMScheduler.step).
// The per-element math is ddim_mean in elementwise.h on vectors, the function the CUDA kernel runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_step.h"
#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 16384;

struct DdimArgs {
  int64_t noise_mode, prediction_type;
  float clip_range;
  bool use_clipped, add_noise;
  uint64_t seed, offset;
};

template <typename scalar_t>
void ddim_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* z, scalar_t* out, scalar_t* pred,
                    const std::vector<DdimCoeffs>& coeffs, const DdimArgs& a, int64_t B, int64_t M) {
  for_each_sample_block(B, M, kGrain, [&](int64_t b, int64_t i, int64_t n) {
    StepBlock<scalar_t> k(x, m, out, pred, i, n);
    const DdimCoeffs c = coeffs[b];
    const float* pz = a.add_noise ? k.noise(z, a.noise_mode, a.seed, a.offset) : nullptr;
    const float* px = k.px;
    const float* pm = k.pm;
    float* px0 = k.px0;
    float* po = k.po;
    const Vec sd(c.std);
    for_each_vec(n, [&](int64_t j, int64_t r) {
      Vec x0;
      Vec o = ddim_mean(Vec::loadu(px + j, r), Vec::loadu(pm + j, r), c, a.prediction_type, a.clip_range,
                        a.use_clipped, &x0);
      x0.store(px0 + j, r);
      if (pz != nullptr) o = o + sd * Vec::loadu(pz + j, r);
      o.store(po + j, r);
    });
    k.finish();
  });
}

// The arguments are checked by ddim_step_op (checks.h).
TensorPair ddim_step_cpu(DdimStepArgs a) {
  auto& [sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset, noise_mode,
         prediction_type, eta, clip_range, use_clipped_model_output, return_pred, offset_tensor, diffusers_beta] = a;
  const int64_t mode = ddim_noise_mode(noise_mode, eta);
  if (mode == kNoisePhilox) offset = philox_offset(offset, offset_tensor, sample);

  const int64_t B = sample.size(0);
  const std::vector<DdimCoeffs> coeffs =
      host_step_coeffs(t, prev_t, alphas_cumprod, [&](int64_t, int64_t tb, int64_t pb, const float* abar) {
        return ddim_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : static_cast<float>(final_alpha_cumprod),
                                static_cast<float>(eta), diffusers_beta);
      });
  // As ddpm_step: Philox noise is indexed by the row-major position, so other layouts go
  // through a contiguous copy.
  const at::Tensor& noise_t = mode == kNoiseTensor ? *noise : at::Tensor();
  const StepLayout io({sample, model_output, noise_t}, /*row_major=*/mode == kNoisePhilox);
  const at::Tensor ms = io.in(model_output), zs = io.in(noise_t);
  auto [out, pred] = io.outputs(return_pred);
  const DdimArgs args{noise_mode, prediction_type, static_cast<float>(clip_range), use_clipped_model_output,
                      eta > 0.0 && noise_mode != kNoNoise, static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset)};
  if (io.has_elements()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddim_step_cpu", [&] {
      ddim_step_loop<scalar_t>(io.first().data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(), data_or_null<scalar_t>(zs),
                               out.data_ptr<scalar_t>(), return_pred ? pred.data_ptr<scalar_t>() : nullptr, coeffs,
                               args, B, io.per_sample());
    });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("ddim_step", &ddim_step_op<ddim_step_cpu>); }

}  // namespace fastddpm
