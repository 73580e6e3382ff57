// dpmpp_step's CUDA registration: allocation (the arguments are checked by dpmpp_step_op, checks.h); the
// kernel is in dpmpp_step.cu. Timesteps are checked on the host only where they live there (a CUDA
// tensor's values would cost a synchronisation); the kernel clamps them into the table.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace {

TensorPair dpmpp_step_cuda(DpmppStepArgs a) {
  const auto& [sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type, clip_range,
               return_pred] = a;
  const bool second = a.second();
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& p_t = second ? *prev_x0 : at::Tensor();
  const StepLayout io({sample, model_output, p_t});
  const at::Tensor ms = io.in(model_output), ps = io.in(p_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const auto lc = second ? last_t->contiguous() : at::Tensor();
  auto [out, pred] = io.outputs(return_pred);
  if (io.has_elements()) {
    const cuda::DpmppStepParams p{.s = step_operands(io, ms, out, pred, return_pred, tc, pc, ac),
                                  .p = data_or_null(ps),
                                  .last_t = data_or_null<int64_t>(lc),
                                  .prediction_type = prediction_type,
                                  .clip_range = static_cast<float>(clip_range)};
    launch_checked("dpmpp_step", [&] { return cuda::launch_dpmpp_step(p, current_stream()); });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("dpmpp_step", &dpmpp_step_op<dpmpp_step_cuda>); }

}  // namespace fastddpm
