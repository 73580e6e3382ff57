// The CPU kernels called through the torch dispatcher, as a C++ user would,
// checked against float64 computed here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

static int failures = 0;

int main() {
  auto q_sample = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("fastddpm::q_sample", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, bool)>();
  at::manual_seed(0);
  const auto x0 = at::randn({3, 5, 7, 11});
  const auto eps = at::randn({3, 5, 7, 11});
  const auto t = at::tensor({0, 17, 999}, at::kLong);
  const auto betas = at::linspace(1e-4, 0.02, 1000, at::kDouble);
  const auto ab = at::cumprod(1 - betas, 0);
  const auto sab = ab.sqrt().to(at::kFloat), s1 = (1 - ab).sqrt().to(at::kFloat);
  auto [xt, v] = q_sample.call(x0, eps, t, sab, s1, true);
  const auto a = sab.to(at::kDouble).index({t}).view({3, 1, 1, 1});
  const auto s = s1.to(at::kDouble).index({t}).view({3, 1, 1, 1});
  const auto ref_xt = a * x0.to(at::kDouble) + s * eps.to(at::kDouble);
  const auto ref_v = a * eps.to(at::kDouble) - s * x0.to(at::kDouble);
  const double e1 = (xt.to(at::kDouble) - ref_xt).abs().max().item<double>();
  const double e2 = (v.to(at::kDouble) - ref_v).abs().max().item<double>();
  if (!(e1 < 1e-5 && e2 < 1e-5)) {
    std::printf("FAIL q_sample: errors %g %g\n", e1, e2);
    ++failures;
  }
  // A bad argument is an error, not a crash.
  bool threw = false;
  try {
    q_sample.call(x0, eps, at::tensor({0, 1000, 2}, at::kLong), sab, s1, false);
  } catch (const c10::Error&) {
    threw = true;
  }
  if (!threw) {
    std::printf("FAIL q_sample accepted t = 1000 with T = 1000\n");
    ++failures;
  }
  if (failures) return 1;
  std::printf("all CPU op tests passed\n");
  return 0;
}
