// Argument checks shared by the C++ kernels. Every message names the argument
// and says what was expected, so a bad call never reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>

namespace fastddpm {

inline void check_float_tensor(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, ": expected a tensor, got None");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              ": expected dtype float32, float16 or bfloat16, got ", dt);
}

inline void check_like(const at::Tensor& x, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(x.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ",
              ref_name, "), got ", x.sizes());
  TORCH_CHECK(x.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
              ref_name, "), got ", x.device());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", x.scalar_type());
}

// A per-sample timestep tensor: int64 of shape (B,) on x's device.
inline void check_timesteps(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected an int64 tensor, got None");
  TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected dtype int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), name, ": expected shape (", x.size(0),
              ",) (one timestep per sample), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
}

// A schedule table: float32, 1-D, on x's device.
inline void check_table(const at::Tensor& table, const at::Tensor& x, const char* name) {
  TORCH_CHECK(table.scalar_type() == at::kFloat, name, ": expected a float32 table, got ",
              table.scalar_type());
  TORCH_CHECK(table.dim() == 1 && table.size(0) >= 1, name, ": expected a non-empty 1-D table, got shape ",
              table.sizes());
  TORCH_CHECK(table.device() == x.device(), name, ": expected device ", x.device(), ", got ",
              table.device());
}

// True when every tensor has the same sizes and strides, covers its memory
// densely without overlap, and has the batch as its outermost dimension: then
// sample b is one contiguous run of numel/B elements starting at b * stride(0),
// in the same order in every tensor (NCHW-contiguous and channels_last both qualify).
inline bool batch_major_dense(std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  if (!first.is_non_overlapping_and_dense()) return false;
  const int64_t B = first.size(0);
  if (B > 1 && first.stride(0) * B != first.numel()) return false;
  for (const auto& t : ts) {
    if (!t.defined()) continue;
    if (t.strides() != first.strides() || !t.is_non_overlapping_and_dense()) return false;
  }
  return true;
}

}  // namespace fastddpm
