// Host-side helpers of the *_cuda.cpp files (host compiler, may use ATen).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS headers
// that a minimal toolkit lacks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {

// The element type of a launch's tensors (checked by the op's check_*_args before).
inline cuda::DType cuda_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return cuda::DType::kFloat;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// The operands of a reverse step's launch: sample (io.first()), model_output ms and the outputs in io's working
// layout, the contiguous timesteps tc, pc and table ac (alive until the launch is queued); pred null where not
// returned.
inline cuda::StepOperands step_operands(const StepLayout& io, const at::Tensor& ms, const at::Tensor& out,
                                        const at::Tensor& pred, bool return_pred, const at::Tensor& tc,
                                        const at::Tensor& pc, const at::Tensor& ac) {
  return {cuda_dtype(io.first()),
          io.first().data_ptr(),
          ms.data_ptr(),
          out.data_ptr(),
          return_pred ? pred.data_ptr() : nullptr,
          tc.data_ptr<int64_t>(),
          pc.data_ptr<int64_t>(),
          ac.data_ptr<float>(),
          ac.size(0),
          io.batch(),
          io.per_sample()};
}

// A CUDA error pending before an op launches belongs to an earlier operation (the runtime keeps the last
// error of any call until someone reads it): raise it as such, consuming it, so that the op's own check
// after its launch sees only its own launches and the next op does not inherit it either. Peeking first
// leaves a clean state untouched (a sticky error, such as a device-side assertion, stays pending anyway).
inline void check_no_pending_error(const char* op) {
  if (cudaPeekAtLastError() == cudaSuccess) return;
  const cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, op, ": a CUDA error was already pending before this op launched its kernels ",
              "(raised by an earlier operation, not by ", op, "): ", cudaGetErrorString(e));
}

// `err`: what a launcher of cuda_launch.h returned right after its own launches.
inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// check_no_pending_error, then `launch()` (a launcher call returning its cudaError_t as an int), then
// check_launch: an error is reported by the op that caused it.
template <typename F>
inline void launch_checked(const char* op, F&& launch) {
  check_no_pending_error(op);
  check_launch(launch(), op);
}

}  // namespace fastddpm
