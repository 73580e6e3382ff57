// group_norm_silu's CUDA registration: argument checks and allocation here (host compiler), the
// kernels in group_norm_silu.cu (torch-free). Selected only with backend="cuda" until a GPU run
// shows it correct and faster. A shift (N, C) is added to x here before the kernels run (one
// extra elementwise pass; the CPU kernel folds it into its passes), and its gradient is the
// spatial sum of dx.
#include <torch/library.h>

#include "fastddpm/checks.h"
#include "fastddpm/cuda_host.h"
#include "fastddpm/cuda_launch.h"

namespace fastddpm {
namespace {

at::Tensor dense(const at::Tensor& x, bool& cl) {
  cl = is_channels_last_dense(x);
  return (cl || x.is_contiguous()) ? x : x.contiguous();
}

// A per-channel parameter as a contiguous fp32 tensor, or an undefined tensor.
at::Tensor param_f32(const c10::optional<at::Tensor>& p) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(at::kFloat).contiguous();
}

// x + shift[:, :, None, ...] in x's dtype and layout, or x itself.
at::Tensor shifted(const at::Tensor& x, const c10::optional<at::Tensor>& shift) {
  if (!shift.has_value() || !shift->defined()) return x;
  const auto& s = *shift;  // checked by check_group_norm_args
  std::vector<int64_t> view(x.dim(), 1);
  view[0] = x.size(0);
  view[1] = x.size(1);
  return x + s.to(x.scalar_type()).reshape(view);
}

int64_t spatial(const at::Tensor& x) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return hw;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cuda(
    const at::Tensor& x_arg, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu) {
  check_group_norm_silu_fwd_args(x_arg, weight, bias, shift, num_groups, eps, at::kCUDA, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard0(x_arg.device());
  const at::Tensor x_in = shifted(x_arg, shift);
  const c10::cuda::CUDAGuard guard(x_in.device());
  bool cl = false;
  const at::Tensor x = dense(x_in, cl);
  const int64_t N = x.size(0), C = x.size(1), G = num_groups, HW = spatial(x);
  int64_t split = 1, s_per = 1;
  cuda::group_norm_silu_split(HW, C / G, N * G, &split, &s_per);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, G}, f32), rstd = at::empty({N, G}, f32);
  if (x.numel() == 0) {  // no sample, no channel or no position: empty groups, the CPU kernel's statistics
    mean.fill_(0.0);
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  at::Tensor p1 = at::empty({N * G * split}, f32), p2 = at::empty({N * G * split}, f32);
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const cuda::GroupNormSiluFwdParams p{.dtype = cuda_dtype(x),
                                       .x = x.data_ptr(),
                                       .y = y.data_ptr(),
                                       .mean = mean.data_ptr<float>(),
                                       .rstd = rstd.data_ptr<float>(),
                                       .w = data_or_null<float>(w),
                                       .b = data_or_null<float>(b),
                                       .p1 = p1.data_ptr<float>(),
                                       .p2 = p2.data_ptr<float>(),
                                       .shape = {N, C, G, HW, cl, silu, split, s_per},
                                       .eps = static_cast<float>(eps)};
  launch_checked("group_norm_silu_fwd", [&] { return cuda::launch_group_norm_silu_fwd(p, current_stream()); });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_arg, const c10::optional<at::Tensor>& shift,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  check_group_norm_silu_bwd_args(grad_y, x_arg, shift, mean, rstd, weight, bias, num_groups, at::kCUDA,
                                 /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard0(x_arg.device());
  const at::Tensor x_in = shifted(x_arg, shift);
  const int64_t N = x_in.size(0);
  const c10::cuda::CUDAGuard guard(x_in.device());
  bool cl = false;
  const at::Tensor x = dense(x_in, cl);
  at::Tensor dy = grad_y.to(x.scalar_type());
  dy = cl ? at::empty_like(x).copy_(dy) : dy.contiguous();
  const int64_t C = x.size(1), G = num_groups, HW = spatial(x);
  int64_t split = 1, s_per = 1;
  cuda::group_norm_silu_split(HW, 1, N * C, &split, &s_per);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor pa = at::empty({N * C * split}, f32), pb = at::empty({N * C * split}, f32);
  at::Tensor c1 = at::empty({N * G}, f32), c2 = at::empty({N * G}, f32);
  at::Tensor dw = at::empty({C}, f32), db = at::empty({C}, f32);
  const at::Tensor w = param_f32(weight), b = param_f32(bias);
  const auto mc = mean.contiguous(), rc = rstd.contiguous();
  if (x.numel() == 0) {  // sums over no element: zero weight and bias gradients, as the CPU kernel gives
    dw.zero_();
    db.zero_();
  } else {
    const cuda::GroupNormSiluBwdParams p{.dtype = cuda_dtype(x),
                                         .dy = dy.data_ptr(),
                                         .x = x.data_ptr(),
                                         .dx = dx.data_ptr(),
                                         .mean = mc.data_ptr<float>(),
                                         .rstd = rc.data_ptr<float>(),
                                         .w = data_or_null<float>(w),
                                         .b = data_or_null<float>(b),
                                         .pa = pa.data_ptr<float>(),
                                         .pb = pb.data_ptr<float>(),
                                         .c1 = c1.data_ptr<float>(),
                                         .c2 = c2.data_ptr<float>(),
                                         .dw = dw.data_ptr<float>(),
                                         .db = db.data_ptr<float>(),
                                         .shape = {N, C, G, HW, cl, silu, split, s_per}};
    launch_checked("group_norm_silu_bwd", [&] { return cuda::launch_group_norm_silu_bwd(p, current_stream()); });
  }
  const bool hw = weight.has_value() && weight->defined(), hb = bias.has_value() && bias->defined();
  at::Tensor dshift = at::empty({0}, x.options());
  if (shift.has_value() && shift->defined()) {
    std::vector<int64_t> dims;
    for (int64_t d = 2; d < dx.dim(); ++d) dims.push_back(d);
    // (an empty dim list would sum everything: a 2-D x has no spatial dims to sum)
    dshift = (dims.empty() ? dx.to(at::kFloat) : dx.to(at::kFloat).sum(dims)).to(shift->scalar_type());
  }
  return {dx, hw ? dw.to(weight->scalar_type()) : at::empty({0}, x.options()),
          hb ? db.to(bias->scalar_type()) : at::empty({0}, x.options()), dshift};
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& shift,
                                int64_t num_groups, double eps, bool silu) {
  return std::get<0>(group_norm_silu_fwd_cuda(x, weight, bias, shift, num_groups, eps, silu));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_fwd", &group_norm_silu_fwd_cuda);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cuda);
}

}  // namespace fastddpm
