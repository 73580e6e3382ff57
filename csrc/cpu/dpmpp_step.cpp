// dpmpp_step on the CPU: the x0 prediction (clipped), and the DPM-Solver++(2M) update from it and the
// previous step's x0 in one pass. The per-element math is dpmpp_step.h on vectors, the functions the CUDA
// kernel runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_step.h"
#include "fastddpm/cpu_vec.h"
#include "fastddpm/dpmpp_step.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 16384;

template <typename scalar_t>
void dpmpp_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* p, scalar_t* out, scalar_t* pred,
                     const std::vector<DpmppCoeffs>& coeffs, int64_t prediction_type, float clip, int64_t B,
                     int64_t M) {
  using Block = FloatBlock<scalar_t>;
  for_each_sample_block(B, M, kGrain, [&](int64_t b, int64_t i, int64_t n) {
    StepBlock<scalar_t> k(x, m, out, pred, i, n);
    const DpmppCoeffs c = coeffs[b];
    // the previous x0 in the block's noise buffer (no noise here); null: first order (c_prev = 0)
    const float* pp = p != nullptr ? Block::load(p + i, k.bz, n) : nullptr;
    const float* px = k.px;
    const float* pm = k.pm;
    float* px0 = k.px0;
    float* po = k.po;
    for_each_vec(n, [&](int64_t j, int64_t r) {
      const Vec xv = Vec::loadu(px + j, r);
      const Vec x0 = dpmpp_x0(xv, Vec::loadu(pm + j, r), c, prediction_type, clip);
      x0.store(px0 + j, r);
      dpmpp_update(xv, x0, pp != nullptr ? Vec::loadu(pp + j, r) : Vec(0.0f), c).store(po + j, r);
    });
    k.finish();
  });
}

// The arguments are checked by dpmpp_step_op (checks.h).
TensorPair dpmpp_step_cpu(DpmppStepArgs a) {
  const auto& [sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type, clip_range,
               return_pred] = a;
  const bool second = a.second();

  const int64_t B = sample.size(0);
  const int64_t T = alphas_cumprod.size(0);
  const auto lc = second ? last_t->contiguous() : at::Tensor();
  const std::vector<DpmppCoeffs> coeffs =
      host_step_coeffs(t, prev_t, alphas_cumprod, [&](int64_t b, int64_t tb, int64_t pb, const float* abar) {
        int64_t lb = tb;
        if (second) {
          lb = lc.data_ptr<int64_t>()[b];
          TORCH_CHECK(lb > tb && lb < T, "last_t: expected t (", tb, ") < last_t < ", T, ", got ", lb,
                      " at index ", b);
        }
        return dpmpp_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : 1.0f, abar[lb], pb < 0, second);
      });
  const at::Tensor& p_t = second ? *prev_x0 : at::Tensor();
  const StepLayout io({sample, model_output, p_t});
  const at::Tensor ms = io.in(model_output), ps = io.in(p_t);
  auto [out, pred] = io.outputs(return_pred);
  if (io.has_elements()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "dpmpp_step_cpu", [&] {
      dpmpp_step_loop<scalar_t>(io.first().data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(),
                                data_or_null<scalar_t>(ps), out.data_ptr<scalar_t>(),
                                return_pred ? pred.data_ptr<scalar_t>() : nullptr, coeffs, prediction_type,
                                static_cast<float>(clip_range), B, io.per_sample());
    });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("dpmpp_step", &dpmpp_step_op<dpmpp_step_cpu>); }

}  // namespace fastddpm
