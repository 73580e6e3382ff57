// dpmpp_step's CUDA registration: checks and allocation; the kernel is in dpmpp_step.cu. Timesteps are
// checked on the host only where they live there (a CUDA tensor's values would cost a synchronisation);
// the kernel clamps them into the table.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace {

std::tuple<at::Tensor, at::Tensor> dpmpp_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const c10::optional<at::Tensor>& prev_x0,
    const at::Tensor& t, const at::Tensor& prev_t, const c10::optional<at::Tensor>& last_t,
    const at::Tensor& alphas_cumprod, int64_t prediction_type, double clip_range, bool return_pred) {
  check_dpmpp_step_args(sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type);
  const bool second = prev_x0.has_value() && prev_x0->defined();
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& p_t = second ? *prev_x0 : at::Tensor();
  const StepLayout io({sample, model_output, p_t});
  const at::Tensor ms = io.in(model_output), ps = io.in(p_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const auto lc = second ? last_t->contiguous() : at::Tensor();
  auto [out, pred] = io.outputs(return_pred);
  if (io.has_elements()) {
    const cuda::DpmppStepParams p{.dtype = cuda_dtype(sample),
                                  .x = io.first().data_ptr(),
                                  .m = ms.data_ptr(),
                                  .p = data_or_null(ps),
                                  .out = out.data_ptr(),
                                  .pred = return_pred ? pred.data_ptr() : nullptr,
                                  .t = tc.data_ptr<int64_t>(),
                                  .prev_t = pc.data_ptr<int64_t>(),
                                  .last_t = data_or_null<int64_t>(lc),
                                  .alphas_cumprod = ac.data_ptr<float>(),
                                  .T = ac.size(0),
                                  .B = io.batch(),
                                  .M = io.per_sample(),
                                  .prediction_type = prediction_type,
                                  .clip_range = static_cast<float>(clip_range)};
    launch_checked("dpmpp_step", [&] { return cuda::launch_dpmpp_step(p, current_stream()); });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("dpmpp_step", &dpmpp_step_cuda); }

}  // namespace fastddpm
