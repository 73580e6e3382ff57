// Argument checks shared by the C++ kernels. Every message names the argument
// and says what was expected, so a bad call never reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <limits>
#include <optional>
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

// Whether x is dense (N, *spatial, C): channels_last for any spatial rank. Size-1 dims may have any
// stride (as in is_contiguous). Computed from the strides: no view is made (a per-call cost).
inline bool is_channels_last_dense(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) return false;
  const auto sz = x.sizes();
  const auto st = x.strides();
  int64_t expect = 1;
  auto ok = [&](int64_t d) {
    if (sz[d] != 1 && st[d] != expect) return false;
    expect *= sz[d];
    return true;
  };
  if (!ok(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d)
    if (!ok(d)) return false;
  return ok(0);
}

// group_norm_silu's arguments, for the kernels of `device` (float64 x only where allow_double: the
// CPU kernel computes it for gradcheck). Raises Python's TypeError / ValueError, as the Python API
// does, so the CPU path needs no checks of its own in Python.
inline void check_group_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
                                  int64_t num_groups, at::DeviceType device, bool allow_double) {
  TORCH_CHECK_VALUE(x.defined(), "x: expected a tensor, got None");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_double && dt == at::kDouble),
                   "x: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.device().type() == device, "x: expected a ", at::DeviceTypeName(device), " tensor, got device ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected shape (N, C, *spatial), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_VALUE(num_groups > 0, "num_groups: expected a positive int, got ", num_groups);
  TORCH_CHECK_VALUE(x.size(1) % num_groups == 0, "num_groups: the number of channels C=", x.size(1),
                    " of x must be divisible by num_groups=", num_groups);
  const char* names[2] = {"weight", "bias"};
  const std::optional<at::Tensor>* ps[2] = {&weight, &bias};
  for (int i = 0; i < 2; ++i) {
    if (!ps[i]->has_value() || !(*ps[i])->defined()) continue;
    const at::Tensor& p = **ps[i];
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == x.size(1), names[i], ": expected shape (", x.size(1),
                      ",) (one per channel of x), got ", p.sizes());
    TORCH_CHECK_VALUE(p.device() == x.device(), names[i], ": expected device ", x.device(), " (that of x), got ",
                      p.device());
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), names[i], ": expected a floating-point dtype, got ",
                     p.scalar_type());
  }
  if (shift.has_value() && shift->defined()) {
    const at::Tensor& s = *shift;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == x.size(1), "shift: expected shape (",
                      x.size(0), ", ", x.size(1), ") (one per sample and channel of x), got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == x.device(), "shift: expected device ", x.device(), " (that of x), got ",
                      s.device());
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), "shift: expected a floating-point dtype, got ",
                     s.scalar_type());
  }
}

// The Philox offset tensor of ddpm_step/ddim_step: a 0-d int64 tensor on x's device.
inline void check_offset_tensor(const at::Tensor& o, const at::Tensor& x) {
  TORCH_CHECK_TYPE(o.scalar_type() == at::kLong && o.dim() == 0, "offset_tensor: expected a 0-d int64 tensor, got a ",
                   o.scalar_type(), " tensor of shape ", o.sizes());
  TORCH_CHECK_VALUE(o.device() == x.device(), "offset_tensor: expected device ", x.device(),
                    " (the device of sample), got ", o.device());
}

// CPU kernels: the Philox counter offset, offset plus the value of offset_tensor where given.
inline int64_t philox_offset(int64_t offset, const c10::optional<at::Tensor>& offset_tensor, const at::Tensor& x) {
  if (!offset_tensor.has_value() || !offset_tensor->defined()) return offset;
  check_offset_tensor(*offset_tensor, x);
  const int64_t v = offset_tensor->item<int64_t>();
  TORCH_CHECK_VALUE(v >= 0, "offset_tensor: expected a non-negative value, got ", v);
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int64_t>::max() - offset, "offset + offset_tensor: overflows int64 (",
                    offset, " + ", v, ")");
  return offset + v;
}

// CUDA kernels: the device address of offset_tensor (read by the kernel, no host sync), or nullptr.
inline const int64_t* offset_tensor_ptr(const c10::optional<at::Tensor>& offset_tensor, const at::Tensor& x) {
  if (!offset_tensor.has_value() || !offset_tensor->defined()) return nullptr;
  check_offset_tensor(*offset_tensor, x);
  return offset_tensor->data_ptr<int64_t>();
}

}  // namespace fastddpm
