// ddpm_step's CUDA registration: checks and allocation; the kernel is in ddpm_step.cu.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
    const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& predicted_variance,
    int64_t seed, int64_t offset, int64_t noise_mode, int64_t prediction_type,
    int64_t variance_type, double clip_range, bool return_pred, const c10::optional<at::Tensor>& offset_tensor,
    bool diffusers_beta) {
  check_float_tensor(sample, "sample");
  TORCH_CHECK(sample.dim() >= 1, "sample: expected a batch dimension, got a 0-d tensor");
  check_like(model_output, sample, "model_output", "sample");
  check_timesteps(t, sample, "t");
  check_timesteps(prev_t, sample, "prev_t");
  check_table(alphas_cumprod, sample, "alphas_cumprod");
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 2, "noise_mode: expected 0, 1 or 2, got ", noise_mode);
  TORCH_CHECK(prediction_type >= 0 && prediction_type <= 2, "prediction_type: expected 0, 1 or 2, got ",
              prediction_type);
  TORCH_CHECK(variance_type == kFixedSmall || variance_type == kFixedSmallLog || variance_type == kFixedLarge ||
                  variance_type == kLearned || variance_type == kLearnedRange,
              "variance_type: expected 0, 1, 2, 4 or 5, got ", variance_type);
  const bool learned = variance_type == kLearned || variance_type == kLearnedRange;
  if (noise_mode == kNoiseTensor) {
    TORCH_CHECK(noise.has_value() && noise->defined(), "noise: required when noise_mode is 1");
    check_like(*noise, sample, "noise", "sample");
  }
  if (learned) {
    TORCH_CHECK(predicted_variance.has_value() && predicted_variance->defined(),
                "predicted_variance: required for the learned variance types");
    check_like(*predicted_variance, sample, "predicted_variance", "sample");
  }
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed, offset: expected non-negative integers");
  // Read by the kernel (no host sync); its sign is the caller's to check (fastddpm.ops does, asynchronously).
  const int64_t* offset_ptr = noise_mode == kNoisePhilox ? offset_tensor_ptr(offset_tensor, sample) : nullptr;
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& noise_t = noise_mode == kNoiseTensor ? *noise : at::Tensor();
  const at::Tensor& pv_t = learned ? *predicted_variance : at::Tensor();
  bool direct = batch_major_dense({sample, model_output, noise_t, pv_t});
  if (noise_mode == kNoisePhilox && !sample.is_contiguous()) direct = false;
  auto prep = [&](const at::Tensor& x) { return (direct || !x.defined()) ? x : x.contiguous(); };
  const at::Tensor xs = prep(sample), ms = prep(model_output), zs = prep(noise_t), ps = prep(pv_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  at::Tensor out = at::empty_like(xs);
  at::Tensor pred = return_pred ? at::empty_like(xs) : at::empty({0}, sample.options());
  const int64_t B = sample.size(0);
  if (B > 0 && sample.numel() > 0) {
    check_launch(cuda::launch_ddpm_step(cuda_dtype_code(sample), xs.data_ptr(), ms.data_ptr(),
                                        zs.defined() ? zs.data_ptr() : nullptr,
                                        ps.defined() ? ps.data_ptr() : nullptr, out.data_ptr(),
                                        return_pred ? pred.data_ptr() : nullptr, tc.data_ptr<int64_t>(),
                                        pc.data_ptr<int64_t>(), ac.data_ptr<float>(), ac.size(0), B,
                                        sample.numel() / B, static_cast<uint64_t>(seed),
                                        static_cast<uint64_t>(offset), offset_ptr, noise_mode, prediction_type,
                                        variance_type, static_cast<float>(clip_range), diffusers_beta,
                                        c10::cuda::getCurrentCUDAStream()),
                 "ddpm_step");
  }
  if (!direct) {
    const auto fmt = sample.suggest_memory_format();
    out = out.contiguous(fmt);
    if (return_pred) pred = pred.contiguous(fmt);
  }
  return {out, pred};
}

void philox_normal_cuda(const at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "out: expected a contiguous float32 tensor");
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed, offset: expected non-negative integers");
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(cuda::launch_philox_normal(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                          static_cast<uint64_t>(offset), c10::cuda::getCurrentCUDAStream()),
               "philox_normal_");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("philox_normal_", &philox_normal_cuda);
}

}  // namespace fastddpm
