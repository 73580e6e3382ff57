// ddim_step's CUDA registration: checks and allocation; the kernel is in ddim_step.cu.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& prev_t,
    const at::Tensor& alphas_cumprod, double final_alpha_cumprod, const c10::optional<at::Tensor>& noise,
    int64_t seed, int64_t offset, int64_t noise_mode, int64_t prediction_type, double eta, double clip_range,
    bool use_clipped_model_output, bool return_pred, const c10::optional<at::Tensor>& offset_tensor,
    bool diffusers_beta) {
  check_ddim_step_args(sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset,
                       noise_mode, prediction_type, eta);
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
    const cuda::DdimStepParams p{
        .dtype = cuda_dtype(sample),
        .x = io.first().data_ptr(),
        .m = ms.data_ptr(),
        .z = data_or_null(zs),
        .out = out.data_ptr(),
        .pred = return_pred ? pred.data_ptr() : nullptr,
        .t = tc.data_ptr<int64_t>(),
        .prev_t = pc.data_ptr<int64_t>(),
        .alphas_cumprod = ac.data_ptr<float>(),
        .T = ac.size(0),
        .B = io.batch(),
        .M = io.per_sample(),
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

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("ddim_step", &ddim_step_cuda); }

}  // namespace fastddpm
