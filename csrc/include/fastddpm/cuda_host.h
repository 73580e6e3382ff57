// Host-side helpers of the *_cuda.cpp files (host compiler, may use ATen).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS headers
// that a minimal toolkit lacks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastddpm {

inline int cuda_dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return -1;
}

inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace fastddpm
