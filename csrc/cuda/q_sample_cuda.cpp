// q_sample's CUDA registration: argument checks and allocation here (host
// compiler), the kernel in q_sample.cu (torch-free).
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace {

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0, const at::Tensor& noise,
                                                 const at::Tensor& t, const at::Tensor& sqrt_ab,
                                                 const at::Tensor& sqrt_1mab, bool with_v) {
  check_float_tensor(x0, "x0");
  TORCH_CHECK(x0.dim() >= 1, "x0: expected a batch dimension, got a 0-d tensor");
  check_like(noise, x0, "noise", "x0");
  check_timesteps(t, x0, "t");
  check_table(sqrt_ab, x0, "sqrt_alphas_cumprod");
  check_table(sqrt_1mab, x0, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_ab.size(0) == sqrt_1mab.size(0),
              "sqrt_one_minus_alphas_cumprod: expected the length of sqrt_alphas_cumprod");
  const c10::cuda::CUDAGuard guard(x0.device());
  const bool direct = batch_major_dense({x0, noise});
  const at::Tensor xin = direct ? x0 : x0.contiguous();
  const at::Tensor ein = direct ? noise : noise.contiguous();
  const auto tc = t.contiguous(), ta = sqrt_ab.contiguous(), tb = sqrt_1mab.contiguous();
  at::Tensor xt = at::empty_like(xin);
  at::Tensor v = with_v ? at::empty_like(xin) : at::empty({0}, x0.options());
  const int64_t B = x0.size(0);
  if (B > 0 && x0.numel() > 0) {
    launch_checked("q_sample", [&] {
      return cuda::launch_q_sample(cuda_dtype_code(x0), xin.data_ptr(), ein.data_ptr(), xt.data_ptr(),
                                   with_v ? v.data_ptr() : nullptr, tc.data_ptr<int64_t>(), ta.data_ptr<float>(),
                                   tb.data_ptr<float>(), ta.size(0), B, x0.numel() / B,
                                   c10::cuda::getCurrentCUDAStream());
    });
  }
  if (!direct) {
    const auto fmt = x0.suggest_memory_format();
    xt = xt.contiguous(fmt);
    if (with_v) v = v.contiguous(fmt);
  }
  return {xt, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace fastddpm
