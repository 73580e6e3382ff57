// Autograd of group_norm_silu_fwd, registered at the Autograd key for every device.
//
// In C++ rather than torch.library.register_autograd: a Python autograd formula runs Python
// on every call, even under no_grad (about 5 us here, the whole time of a small GroupNorm).
// torch.compile traces through it as through any C++ autograd kernel: the forward and
// backward ops have fake implementations (fastddpm/ops/group_norm_silu.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastddpm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const OptT& w, const OptT& b,
                                                        const OptT& shift, int64_t G, double eps, bool silu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastddpm::group_norm_silu_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const OptT&, const OptT&, const OptT&, int64_t, double, bool)>();
  return op.call(x, w, b, shift, G, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(const at::Tensor& gy, const at::Tensor& x,
                                                                    const OptT& shift, const at::Tensor& mean,
                                                                    const at::Tensor& rstd, const OptT& w,
                                                                    const OptT& b, int64_t G, bool silu) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastddpm::group_norm_silu_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&, const OptT&,
              const OptT&, int64_t, bool)>();
  return op.call(gy, x, shift, mean, rstd, w, b, G, silu);
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptT& weight, const OptT& bias,
                               const OptT& shift, int64_t num_groups, double eps, bool silu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = call_fwd(x, weight, bias, shift, num_groups, eps, silu);
    // The backward recomputes from x: nothing else of x's size is kept.
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            shift.value_or(at::Tensor())});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    // The backward kernel has no derivative of its own: a graph of it (create_graph=True, a gradient
    // penalty) would hold silent zeros for the second derivatives.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "group_norm_silu: the fused backward is differentiable only once (create_graph=True asks for a "
                "second derivative); use backend='torch' for double backward");
    auto [dx, dw, db, dshift] = call_bwd(grads[0], s[0], opt(s[5]), s[1], s[2], opt(s[3]), opt(s[4]),
                                         ctx->saved_data["num_groups"].toInt(), ctx->saved_data["silu"].toBool());
    // needs_input_grad counts the tensors given to apply(), a None optional not among them: x, then each
    // of weight, bias, shift that was given, in order.
    int64_t edge = 0;
    auto needs = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    if (needs(true)) out[0] = dx;
    if (needs(s[3].defined())) out[1] = dw;
    if (needs(s[4].defined())) out[2] = db;
    if (needs(s[5].defined())) out[3] = dshift;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_autograd(const at::Tensor& x, const OptT& weight,
                                                                           const OptT& bias, const OptT& shift,
                                                                           int64_t num_groups, double eps, bool silu) {
  auto needs = [](const OptT& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || needs(weight) || needs(bias) || needs(shift))) {
    // Nothing to record (inference, no_grad): skip the autograd node and its saved state.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd(x, weight, bias, shift, num_groups, eps, silu);
  }
  auto r = GroupNormSiLUFunction::apply(x, weight, bias, shift, num_groups, eps, silu);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, Autograd, m) { m.impl("group_norm_silu_fwd", &group_norm_silu_fwd_autograd); }

}  // namespace fastddpm
