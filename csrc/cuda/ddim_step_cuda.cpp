// ddim_step's CUDA registration: checks and allocation; the kernel is in ddim_step.cu.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {
// Defined in ddim_step.cu (declared here, not in cuda_launch.h, to keep this op's files together).
int launch_ddim_step(int dtype, const void* x, const void* m, const void* z, void* out, void* pred,
                     const int64_t* t, const int64_t* prev_t, const float* alphas_cumprod, int64_t T,
                     int64_t B, int64_t M, float final_alpha_cumprod, uint64_t seed, uint64_t offset,
                     const int64_t* offset_ptr, int64_t noise_mode, int64_t prediction_type, float eta,
                     float clip_range, bool use_clipped, bool diffusers_beta, cudaStream_t stream);
}  // namespace cuda

namespace {

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& prev_t,
    const at::Tensor& alphas_cumprod, double final_alpha_cumprod, const c10::optional<at::Tensor>& noise,
    int64_t seed, int64_t offset, int64_t noise_mode, int64_t prediction_type, double eta, double clip_range,
    bool use_clipped_model_output, bool return_pred, const c10::optional<at::Tensor>& offset_tensor,
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
  TORCH_CHECK(eta >= 0.0, "eta: expected a non-negative number, got ", eta);
  TORCH_CHECK(final_alpha_cumprod > 0.0 && final_alpha_cumprod <= 1.0,
              "final_alpha_cumprod: expected a value in (0, 1], got ", final_alpha_cumprod);
  const int64_t mode = eta > 0.0 ? noise_mode : kNoNoise;
  if (mode == kNoiseTensor) {
    TORCH_CHECK(noise.has_value() && noise->defined(), "noise: required when noise_mode is 1");
    check_like(*noise, sample, "noise", "sample");
  }
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed, offset: expected non-negative integers");
  // Read by the kernel (no host sync); its sign is the caller's to check (fastddpm.ops does, asynchronously).
  const int64_t* offset_ptr = mode == kNoisePhilox ? offset_tensor_ptr(offset_tensor, sample) : nullptr;
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor& noise_t = mode == kNoiseTensor ? *noise : at::Tensor();
  bool direct = batch_major_dense({sample, model_output, noise_t});
  if (mode == kNoisePhilox && !sample.is_contiguous()) direct = false;
  auto prep = [&](const at::Tensor& x) { return (direct || !x.defined()) ? x : x.contiguous(); };
  const at::Tensor xs = prep(sample), ms = prep(model_output), zs = prep(noise_t);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  at::Tensor out = at::empty_like(xs);
  at::Tensor pred = return_pred ? at::empty_like(xs) : at::empty({0}, sample.options());
  const int64_t B = sample.size(0);
  if (B > 0 && sample.numel() > 0) {
    check_launch(cuda::launch_ddim_step(cuda_dtype_code(sample), xs.data_ptr(), ms.data_ptr(),
                                        zs.defined() ? zs.data_ptr() : nullptr, out.data_ptr(),
                                        return_pred ? pred.data_ptr() : nullptr, tc.data_ptr<int64_t>(),
                                        pc.data_ptr<int64_t>(), ac.data_ptr<float>(), ac.size(0), B,
                                        sample.numel() / B, static_cast<float>(final_alpha_cumprod),
                                        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), offset_ptr, mode,
                                        prediction_type, static_cast<float>(eta),
                                        static_cast<float>(clip_range), use_clipped_model_output, diffusers_beta,
                                        c10::cuda::getCurrentCUDAStream()),
                 "ddim_step");
  }
  if (!direct) {
    const auto fmt = sample.suggest_memory_format();
    out = out.contiguous(fmt);
    if (return_pred) pred = pred.contiguous(fmt);
  }
  return {out, pred};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("ddim_step", &ddim_step_cuda); }

}  // namespace fastddpm
