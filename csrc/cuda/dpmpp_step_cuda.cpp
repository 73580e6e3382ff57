// dpmpp_step's CUDA registration: checks and allocation; the kernel is in dpmpp_step.cu. Timesteps are
// checked on the host only where they live there (a CUDA tensor's values would cost a synchronisation);
// the kernel clamps them into the table.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/dpmpp_step.h"

namespace fastddpm {
namespace {

std::tuple<at::Tensor, at::Tensor> dpmpp_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const c10::optional<at::Tensor>& prev_x0,
    const at::Tensor& t, const at::Tensor& prev_t, const c10::optional<at::Tensor>& last_t,
    const at::Tensor& alphas_cumprod, int64_t prediction_type, double clip_range, bool return_pred) {
  check_float_tensor(sample, "sample");
  TORCH_CHECK(sample.dim() >= 1, "sample: expected a batch dimension, got a 0-d tensor");
  check_like(model_output, sample, "model_output", "sample");
  const bool second = prev_x0.has_value() && prev_x0->defined();
  if (second) {
    check_like(*prev_x0, sample, "prev_x0", "sample");
    TORCH_CHECK(last_t.has_value() && last_t->defined(), "last_t: required when prev_x0 is given");
    check_timesteps(*last_t, sample, "last_t");
  }
  check_timesteps(t, sample, "t");
  check_timesteps(prev_t, sample, "prev_t");
  check_table(alphas_cumprod, sample, "alphas_cumprod");
  TORCH_CHECK(prediction_type >= 0 && prediction_type <= 2,
              "prediction_type: expected 0 (epsilon), 1 (sample) or 2 (v_prediction), got ", prediction_type);
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& p_t = second ? *prev_x0 : at::Tensor();
  const bool direct = batch_major_dense({sample, model_output, p_t});
  auto prep = [&](const at::Tensor& x) { return (direct || !x.defined()) ? x : x.contiguous(); };
  const at::Tensor xs = prep(sample), ms = prep(model_output), ps = prep(p_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const auto lc = second ? last_t->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xs);
  at::Tensor pred = return_pred ? at::empty_like(xs) : at::empty({0}, sample.options());
  const int64_t B = sample.size(0);
  if (B > 0 && sample.numel() > 0) {
    const DpmppStepParams a{cuda_dtype_code(sample),
                            xs.data_ptr(),
                            ms.data_ptr(),
                            second ? ps.data_ptr() : nullptr,
                            out.data_ptr(),
                            return_pred ? pred.data_ptr() : nullptr,
                            tc.data_ptr<int64_t>(),
                            pc.data_ptr<int64_t>(),
                            second ? lc.data_ptr<int64_t>() : nullptr,
                            ac.data_ptr<float>(),
                            ac.size(0),
                            B,
                            sample.numel() / B,
                            prediction_type,
                            static_cast<float>(clip_range)};
    check_launch(cuda::launch_dpmpp_step(a, c10::cuda::getCurrentCUDAStream()), "dpmpp_step");
  }
  if (!direct) {
    const auto fmt = sample.suggest_memory_format();
    out = out.contiguous(fmt);
    if (return_pred) pred = pred.contiguous(fmt);
  }
  return {out, pred};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("dpmpp_step", &dpmpp_step_cuda); }

}  // namespace fastddpm
