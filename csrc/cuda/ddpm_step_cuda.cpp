// ddpm_step's CUDA registration: allocation (the arguments are checked by ddpm_step_op, checks.h); the
// kernel is in ddpm_step.cu.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

TensorPair ddpm_step_cuda(DdpmStepArgs a) {
  const auto& [sample, model_output, t, prev_t, alphas_cumprod, noise, predicted_variance, seed, offset, noise_mode,
               prediction_type, variance_type, clip_range, return_pred, offset_tensor, diffusers_beta] = a;
  // Read by the kernel (no host sync); its sign is the caller's to check (fastddpm.ops does, asynchronously).
  const int64_t* offset_ptr = noise_mode == kNoisePhilox ? offset_tensor_ptr(offset_tensor, sample) : nullptr;
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& noise_t = noise_mode == kNoiseTensor ? *noise : at::Tensor();
  const at::Tensor& pv_t = is_learned_variance(variance_type) ? *predicted_variance : at::Tensor();
  const StepLayout io({sample, model_output, noise_t, pv_t}, /*row_major=*/noise_mode == kNoisePhilox);
  const at::Tensor ms = io.in(model_output), zs = io.in(noise_t), ps = io.in(pv_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  auto [out, pred] = io.outputs(return_pred);
  if (io.has_elements()) {
    const cuda::DdpmStepParams p{
        .s = step_operands(io, ms, out, pred, return_pred, tc, pc, ac),
        .z = data_or_null(zs),
        .pv = data_or_null(ps),
        .philox = {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), offset_ptr},
        .noise_mode = noise_mode,
        .prediction_type = prediction_type,
        .variance_type = variance_type,
        .clip_range = static_cast<float>(clip_range),
        .diffusers_beta = diffusers_beta};
    launch_checked("ddpm_step", [&] { return cuda::launch_ddpm_step(p, current_stream()); });
  }
  return io.finish(out, pred, return_pred);
}

void philox_normal_cuda(const at::Tensor& out, int64_t seed, int64_t offset) {
  check_philox_normal_args(out, seed, offset);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_checked("philox_normal_", [&] {
    return cuda::launch_philox_normal(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                      static_cast<uint64_t>(offset), current_stream());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_op<ddpm_step_cuda>);
  m.impl("philox_normal_", &philox_normal_cuda);
}

}  // namespace fastddpm
