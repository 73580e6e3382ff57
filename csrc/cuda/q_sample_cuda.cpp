// q_sample's CUDA registration: allocation here (host compiler; the arguments are checked by
// q_sample_op, checks.h), the kernel in q_sample.cu (torch-free).
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace {

TensorPair q_sample_cuda(QSampleArgs a) {
  const auto& [x0, noise, t, sqrt_ab, sqrt_1mab, with_v] = a;
  const c10::cuda::CUDAGuard guard(x0.device());
  const StepLayout io({x0, noise});
  const at::Tensor ein = io.in(noise);
  const auto tc = t.contiguous(), ta = sqrt_ab.contiguous(), tb = sqrt_1mab.contiguous();
  auto [xt, v] = io.outputs(with_v);
  if (io.has_elements()) {
    const cuda::QSampleParams p{.dtype = cuda_dtype(x0),
                                .x0 = io.first().data_ptr(),
                                .eps = ein.data_ptr(),
                                .xt = xt.data_ptr(),
                                .v = with_v ? v.data_ptr() : nullptr,
                                .t = tc.data_ptr<int64_t>(),
                                .sqrt_ab = ta.data_ptr<float>(),
                                .sqrt_1mab = tb.data_ptr<float>(),
                                .T = ta.size(0),
                                .B = io.batch(),
                                .M = io.per_sample()};
    launch_checked("q_sample", [&] { return cuda::launch_q_sample(p, current_stream()); });
  }
  return io.finish(xt, v, with_v);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) { m.impl("q_sample", &q_sample_op<q_sample_cuda>); }

}  // namespace fastddpm
