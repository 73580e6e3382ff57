// Argument checks shared by the C++ kernels. Every message names the argument
// and says what was expected, so a bad call never reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastddpm/elementwise.h"

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

// ---------------------------------------------------------------------------
// Codes (elementwise.h's table) and scalars common to several ops.
// ---------------------------------------------------------------------------
inline void check_prediction_type(int64_t pt) {
  TORCH_CHECK(pt == kEpsilon || pt == kSample || pt == kVPrediction, "prediction_type: expected ", kEpsilon,
              " (epsilon), ", kSample, " (sample) or ", kVPrediction, " (v_prediction), got ", pt);
}

inline void check_noise_mode(int64_t mode) {
  TORCH_CHECK(mode == kNoNoise || mode == kNoiseTensor || mode == kNoisePhilox, "noise_mode: expected ", kNoNoise,
              ", ", kNoiseTensor, " or ", kNoisePhilox, ", got ", mode);
}

inline bool is_learned_variance(int64_t vt) { return vt == kLearned || vt == kLearnedRange; }
inline bool is_fixed_variance(int64_t vt) { return vt == kFixedSmall || vt == kFixedSmallLog || vt == kFixedLarge; }

inline void check_variance_type(int64_t vt) {
  TORCH_CHECK(is_fixed_variance(vt) || is_learned_variance(vt), "variance_type: expected ", kFixedSmall, ", ",
              kFixedSmallLog, ", ", kFixedLarge, ", ", kLearned, " or ", kLearnedRange, ", got ", vt);
}

// The (seed, offset) of a Philox stream; an offset tensor is checked where it is read (philox_offset,
// offset_tensor_ptr).
inline void check_seed_offset(int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, "seed: expected a non-negative integer, got ", seed);
  TORCH_CHECK(offset >= 0, "offset: expected a non-negative integer, got ", offset);
}

// The batched input every elementwise op takes first (x0, sample).
inline void check_batched(const at::Tensor& x, const char* name) {
  check_float_tensor(x, name);
  TORCH_CHECK(x.dim() >= 1, name, ": expected a batch dimension, got a 0-d tensor");
}

// An optional operand that `why` makes required: defined, and of x's shape, device and dtype.
inline void check_required_like(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name,
                                const char* x_name, const char* why) {
  TORCH_CHECK(p.has_value() && p->defined(), name, ": required ", why);
  check_like(*p, x, name, x_name);
}

// A batched tensor x, a second operand of its shape, device and dtype, and one timestep per sample: the start
// of every elementwise op's arguments (q_sample's x0, noise, t; a reverse step's sample, model_output, t).
inline void check_pair_and_timesteps(const at::Tensor& x, const at::Tensor& other, const at::Tensor& t,
                                     const char* x_name, const char* other_name) {
  check_batched(x, x_name);
  check_like(other, x, other_name, x_name);
  check_timesteps(t, x, "t");
}

// sample, model_output, t, prev_t and the alphas_cumprod table: what every reverse step takes.
inline void check_step_inputs(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                              const at::Tensor& prev_t, const at::Tensor& alphas_cumprod) {
  check_pair_and_timesteps(sample, model_output, t, "sample", "model_output");
  check_timesteps(prev_t, sample, "prev_t");
  check_table(alphas_cumprod, sample, "alphas_cumprod");
}

// ---------------------------------------------------------------------------
// One argument check per op, called by its CPU (csrc/cpu/<op>.cpp) and CUDA (csrc/cuda/<op>_cuda.cpp)
// registrations alike, in the order of the schema's arguments (csrc/ops.cpp). What only one device can
// check stays with it: timestep values on the CPU (on a GPU they would cost a sync: its kernels clamp
// them into the table) and the offset tensor, read on the host by the CPU and by the kernel on a GPU.
// ---------------------------------------------------------------------------
inline void check_q_sample_args(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                                const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab) {
  check_pair_and_timesteps(x0, noise, t, "x0", "noise");
  check_table(sqrt_ab, x0, "sqrt_alphas_cumprod");
  check_table(sqrt_1mab, x0, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_ab.size(0) == sqrt_1mab.size(0),
              "sqrt_one_minus_alphas_cumprod: expected the length of sqrt_alphas_cumprod (", sqrt_ab.size(0),
              "), got ", sqrt_1mab.size(0));
}

inline void check_ddpm_step_args(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                                 const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                                 const c10::optional<at::Tensor>& noise,
                                 const c10::optional<at::Tensor>& predicted_variance, int64_t seed, int64_t offset,
                                 int64_t noise_mode, int64_t prediction_type, int64_t variance_type) {
  check_step_inputs(sample, model_output, t, prev_t, alphas_cumprod);
  check_noise_mode(noise_mode);
  check_prediction_type(prediction_type);
  check_variance_type(variance_type);
  if (noise_mode == kNoiseTensor) check_required_like(noise, sample, "noise", "sample", "when noise_mode is 1");
  if (is_learned_variance(variance_type)) {
    check_required_like(predicted_variance, sample, "predicted_variance", "sample",
                        "for the learned variance types");
  }
  check_seed_offset(seed, offset);
}

// ddpm_step_randn: ddpm_step with torch's own normal_ noise (CPU only), fixed variance types.
inline void check_ddpm_step_randn_args(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                                       const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                                       const c10::optional<at::Generator>& generator, int64_t prediction_type,
                                       int64_t variance_type) {
  check_batched(sample, "sample");
  TORCH_CHECK(is_fixed_variance(variance_type), "variance_type: ddpm_step_randn takes the fixed variance types ",
              kFixedSmall, ", ", kFixedSmallLog, " or ", kFixedLarge, ", got ", variance_type);
  TORCH_CHECK(!generator.has_value() || !generator->defined() || generator->device().is_cpu(),
              "generator: expected a CPU generator, got one on ", generator->device());
  check_step_inputs(sample, model_output, t, prev_t, alphas_cumprod);
  check_prediction_type(prediction_type);
}

inline void check_ddim_step_args(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                                 const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                                 double final_alpha_cumprod, const c10::optional<at::Tensor>& noise, int64_t seed,
                                 int64_t offset, int64_t noise_mode, int64_t prediction_type, double eta) {
  check_step_inputs(sample, model_output, t, prev_t, alphas_cumprod);
  check_noise_mode(noise_mode);
  check_prediction_type(prediction_type);
  TORCH_CHECK(eta >= 0.0, "eta: expected a non-negative number, got ", eta);
  TORCH_CHECK(final_alpha_cumprod > 0.0 && final_alpha_cumprod <= 1.0,
              "final_alpha_cumprod: expected a value in (0, 1], got ", final_alpha_cumprod);
  if (noise_mode == kNoiseTensor) check_required_like(noise, sample, "noise", "sample", "when noise_mode is 1");
  check_seed_offset(seed, offset);
}

// CPU kernels, which read the timesteps on the host: sample b's t in [0, T) and prev_t < t (any negative
// prev_t is the end of the chain, as diffusers reads it: DDIM's t = 0 steps to -20 with 50 of 1000 steps).
inline void check_step_timestep_values(int64_t tb, int64_t pb, int64_t T, int64_t b) {
  TORCH_CHECK(tb >= 0 && tb < T, "t: expected timesteps in [0, ", T, "), got ", tb, " at index ", b);
  TORCH_CHECK(pb < tb, "prev_t: expected prev_t < t (", tb, "), got ", pb, " at index ", b);
}

// CPU kernels: a step's per-sample coefficients coeffs_of(b, t_b, prev_t_b, abar), the timesteps read on
// the host and range-checked first (check_step_timestep_values).
template <typename F>
auto host_step_coeffs(const at::Tensor& t, const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                      F&& coeffs_of) {
  using Coeffs = decltype(coeffs_of(int64_t{0}, int64_t{0}, int64_t{0}, static_cast<const float*>(nullptr)));
  const int64_t B = t.size(0), T = alphas_cumprod.size(0);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const float* abar = ac.data_ptr<float>();
  std::vector<Coeffs> coeffs(B);
  for (int64_t b = 0; b < B; ++b) {
    check_step_timestep_values(tp[b], pp[b], T, b);
    coeffs[b] = coeffs_of(b, tp[b], pp[b], abar);
  }
  return coeffs;
}

// The noise ddim_step adds: none where eta == 0 (diffusers draws none), else noise_mode's.
inline int64_t ddim_noise_mode(int64_t noise_mode, double eta) { return eta > 0.0 ? noise_mode : kNoNoise; }

inline void check_dpmpp_step_args(const at::Tensor& sample, const at::Tensor& model_output,
                                  const c10::optional<at::Tensor>& prev_x0, const at::Tensor& t,
                                  const at::Tensor& prev_t, const c10::optional<at::Tensor>& last_t,
                                  const at::Tensor& alphas_cumprod, int64_t prediction_type) {
  check_batched(sample, "sample");
  check_like(model_output, sample, "model_output", "sample");
  if (prev_x0.has_value() && prev_x0->defined()) {
    check_like(*prev_x0, sample, "prev_x0", "sample");
    TORCH_CHECK(last_t.has_value() && last_t->defined(), "last_t: required when prev_x0 is given");
    check_timesteps(*last_t, sample, "last_t");
  }
  check_timesteps(t, sample, "t");
  check_timesteps(prev_t, sample, "prev_t");
  check_table(alphas_cumprod, sample, "alphas_cumprod");
  check_prediction_type(prediction_type);
}

// philox_normal_'s output.
inline void check_philox_normal_args(const at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "out: expected a contiguous float32 tensor");
  check_seed_offset(seed, offset);
}

// group_norm_silu / group_norm_silu_fwd: check_group_norm_args and eps.
inline void check_group_norm_silu_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                                           at::DeviceType device, bool allow_double) {
  check_group_norm_args(x, weight, bias, shift, num_groups, device, allow_double);
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected a non-negative float, got ", eps);
}

// group_norm_silu_bwd: the forward's arguments, grad_y of x's shape, and the saved (N, G) statistics
// mean and rstd in one floating dtype (float32 alone where !allow_double: the CUDA kernels read fp32).
inline void check_group_norm_silu_bwd_args(const at::Tensor& grad_y, const at::Tensor& x,
                                           const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                                           const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, int64_t num_groups,
                                           at::DeviceType device, bool allow_double) {
  check_group_norm_args(x, weight, bias, shift, num_groups, device, allow_double);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y: expected shape ", x.sizes(), " (that of x), got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), "grad_y: expected device ", x.device(), ", got ", grad_y.device());
  const int64_t N = x.size(0);
  for (const auto* p : {&mean, &rstd}) {
    const char* name = p == &mean ? "mean" : "rstd";
    TORCH_CHECK(p->dim() == 2 && p->size(0) == N && p->size(1) == num_groups, name, ": expected shape (", N, ", ",
                num_groups, "), got ", p->sizes());
    TORCH_CHECK(p->device() == x.device(), name, ": expected device ", x.device(), ", got ", p->device());
    TORCH_CHECK(at::isFloatingType(p->scalar_type()), name, ": expected a floating-point dtype, got ",
                p->scalar_type());
    TORCH_CHECK(allow_double || p->scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                p->scalar_type());
  }
  TORCH_CHECK(rstd.scalar_type() == mean.scalar_type(), "rstd: expected the dtype of mean (", mean.scalar_type(),
              "), got ", rstd.scalar_type());
}

// ---------------------------------------------------------------------------
// Each op's schema-shaped entry, csrc/ops.cpp's argument list written once: it runs the op's
// check_*_args and hands the arguments, in one struct of references, to a device's implementation Impl.
// The CPU and CUDA files register <op>_op<their impl>, so neither restates the signature and neither can
// skip the checks.
// ---------------------------------------------------------------------------
using OptTensor = c10::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

struct QSampleArgs {
  const at::Tensor &x0, &noise, &t, &sqrt_ab, &sqrt_1mab;
  bool with_v;
};
template <TensorPair (*Impl)(QSampleArgs)>
TensorPair q_sample_op(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& sqrt_ab,
                       const at::Tensor& sqrt_1mab, bool with_v) {
  check_q_sample_args(x0, noise, t, sqrt_ab, sqrt_1mab);
  return Impl({x0, noise, t, sqrt_ab, sqrt_1mab, with_v});
}

struct DdpmStepArgs {
  const at::Tensor &sample, &model_output, &t, &prev_t, &alphas_cumprod;
  const OptTensor &noise, &predicted_variance;
  int64_t seed, offset, noise_mode, prediction_type, variance_type;
  double clip_range;
  bool return_pred;
  const OptTensor& offset_tensor;
  bool diffusers_beta;
};
template <TensorPair (*Impl)(DdpmStepArgs)>
TensorPair ddpm_step_op(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                        const at::Tensor& prev_t, const at::Tensor& alphas_cumprod, const OptTensor& noise,
                        const OptTensor& predicted_variance, int64_t seed, int64_t offset, int64_t noise_mode,
                        int64_t prediction_type, int64_t variance_type, double clip_range, bool return_pred,
                        const OptTensor& offset_tensor, bool diffusers_beta) {
  check_ddpm_step_args(sample, model_output, t, prev_t, alphas_cumprod, noise, predicted_variance, seed, offset,
                       noise_mode, prediction_type, variance_type);
  return Impl({sample, model_output, t, prev_t, alphas_cumprod, noise, predicted_variance, seed, offset, noise_mode,
               prediction_type, variance_type, clip_range, return_pred, offset_tensor, diffusers_beta});
}

struct DdimStepArgs {
  const at::Tensor &sample, &model_output, &t, &prev_t, &alphas_cumprod;
  double final_alpha_cumprod;
  const OptTensor& noise;
  int64_t seed, offset, noise_mode, prediction_type;
  double eta, clip_range;
  bool use_clipped_model_output, return_pred;
  const OptTensor& offset_tensor;
  bool diffusers_beta;
};
template <TensorPair (*Impl)(DdimStepArgs)>
TensorPair ddim_step_op(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
                        const at::Tensor& prev_t, const at::Tensor& alphas_cumprod, double final_alpha_cumprod,
                        const OptTensor& noise, int64_t seed, int64_t offset, int64_t noise_mode,
                        int64_t prediction_type, double eta, double clip_range, bool use_clipped_model_output,
                        bool return_pred, const OptTensor& offset_tensor, bool diffusers_beta) {
  check_ddim_step_args(sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset,
                       noise_mode, prediction_type, eta);
  return Impl({sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset, noise_mode,
               prediction_type, eta, clip_range, use_clipped_model_output, return_pred, offset_tensor,
               diffusers_beta});
}

struct DpmppStepArgs {
  const at::Tensor &sample, &model_output;
  const OptTensor& prev_x0;
  const at::Tensor &t, &prev_t;
  const OptTensor& last_t;
  const at::Tensor& alphas_cumprod;
  int64_t prediction_type;
  double clip_range;
  bool return_pred;
  bool second() const { return prev_x0.has_value() && prev_x0->defined(); }  // DPM-Solver++(2M)'s second order
};
template <TensorPair (*Impl)(DpmppStepArgs)>
TensorPair dpmpp_step_op(const at::Tensor& sample, const at::Tensor& model_output, const OptTensor& prev_x0,
                         const at::Tensor& t, const at::Tensor& prev_t, const OptTensor& last_t,
                         const at::Tensor& alphas_cumprod, int64_t prediction_type, double clip_range,
                         bool return_pred) {
  check_dpmpp_step_args(sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type);
  return Impl({sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type, clip_range,
               return_pred});
}

// ---------------------------------------------------------------------------
// The layout the elementwise ops (q_sample, ddpm_step, ddim_step, dpmpp_step) work in, on every device:
// the operands as given when they share one batch-major dense layout (batch_major_dense), else
// contiguous copies. Where row_major (in-kernel Philox noise, indexed by the row-major position, so the
// numbers do not depend on the layout) the first operand must be contiguous to be used in place. The
// outputs are allocated in the working layout and handed back in the first operand's memory format
// (channels_last stays channels_last).
// ---------------------------------------------------------------------------
class StepLayout {
 public:
  StepLayout(std::initializer_list<at::Tensor> operands, bool row_major = false)
      : ref_(*operands.begin()),
        direct_(batch_major_dense(operands) && (!row_major || ref_.is_contiguous())),
        first_(in(ref_)) {}

  // x in the working layout (an undefined x stays undefined).
  at::Tensor in(const at::Tensor& x) const { return (direct_ || !x.defined()) ? x : x.contiguous(); }
  // The first operand in the working layout.
  const at::Tensor& first() const { return first_; }
  int64_t batch() const { return ref_.size(0); }
  // Elements per sample (call only where has_elements()).
  int64_t per_sample() const { return ref_.numel() / ref_.size(0); }
  bool has_elements() const { return ref_.size(0) > 0 && ref_.numel() > 0; }

  // Two outputs like the first operand; the second only where `second` (else an empty tensor).
  std::tuple<at::Tensor, at::Tensor> outputs(bool second) const {
    return {at::empty_like(first_), second ? at::empty_like(first_) : at::empty({0}, ref_.options())};
  }
  // The outputs in the first operand's memory format.
  std::tuple<at::Tensor, at::Tensor> finish(at::Tensor a, at::Tensor b, bool second) const {
    if (!direct_) {
      const auto fmt = ref_.suggest_memory_format();
      a = a.contiguous(fmt);
      if (second) b = b.contiguous(fmt);
    }
    return {a, b};
  }

 private:
  at::Tensor ref_;
  bool direct_;
  at::Tensor first_;
};

// The data pointer of an optional operand (undefined: null).
template <typename T = void>
inline T* data_or_null(const at::Tensor& x) {
  if (!x.defined()) return nullptr;
  if constexpr (std::is_void_v<T>) {
    return x.data_ptr();
  } else {
    return x.data_ptr<T>();
  }
}

}  // namespace fastddpm
