// ddim_step's CUDA registration: allocation (the arguments are checked by ddim_step_op, checks.h); the
// kernel is in ddim_step.cu.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

TensorPair ddim_step_cuda(DdimStepArgs a) {
  const auto& [sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset, noise_mode,
               prediction_type, eta, clip_range, use_clipped_model_output, return_pred, offset_tensor,
               diffusers_beta] = a;
  const int64_t mode = ddim_noise_mode(noise_mode, eta);
  // Read by the kernel (no host sync); its sign is the caller's to check (fastddpm.ops does, asynchronously).
  const int64_t* offset_ptr = mode == kNoisePhilox ? offset_tensor_ptr(offset_tensor, sample) : nullptr;
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& noise_t = mode == kNoiseTensor ? *noise : at::Tensor();
  const StepLayout io({sample, model_output, noise_t}, /*row_major=*/mode == kNoisePhilox);
  const at::Tensor ms = io.in(model_output), zs = io.in(noise_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  auto [out, pred] = io.outputs(return_pred);
  if (io.has_elements()) {
    const cuda::DdimStepParams p{.s = step_operands(io, ms, out, pred, return_pred, tc, pc, ac),
                                 .z = data_or_null(zs),
                                 .final_alpha_cumprod = static_cast<float>(final_alpha_cumprod),
                                 .philox = {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), offset_ptr},
                                 .noise_mode = mode,
                                 .prediction_type = prediction_type,
                                 .eta = static_cast<float>(eta),
                                 .clip_range = static_cast<float>(clip_range),
                                 .use_clipped_model_output = use_clipped_model_output,
                                 .diffusers_beta = diffusers_beta};
    launch_checked("ddim_step", [&] { return cuda::launch_ddim_step(p, current_stream()); });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("ddim_step", &ddim_step_op<ddim_step_cuda>); }

}  // namespace fastddpm
