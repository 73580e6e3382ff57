// dpmpp_step on the CPU: the x0 prediction (clipped), and the DPM-Solver++(2M) update from it and the
// previous step's x0 in one pass. The per-element math is dpmpp_step.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_vec.h"
#include "fastddpm/dpmpp_step.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 16384;

// The branch on prediction type is hoisted out of the element loop by the template so the loop vectorises.
template <int64_t PT, bool Second>
inline void dpmpp_block(const float* px, const float* pm, const float* pp, float* po, float* px0,
                        const DpmppCoeffs& c, float clip, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float x0 = dpmpp_x0(px[j], pm[j], c, PT, clip);
    px0[j] = x0;
    po[j] = dpmpp_update(px[j], x0, Second ? pp[j] : 0.0f, c);
  }
}

template <typename scalar_t>
void dpmpp_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* p, scalar_t* out, scalar_t* pred,
                     const std::vector<DpmppCoeffs>& coeffs, int64_t prediction_type, float clip, int64_t B,
                     int64_t M) {
  using Block = FloatBlock<scalar_t>;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float bx[kBlock], bm[kBlock], bp[kBlock], bo[kBlock], b0[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      const DpmppCoeffs c = coeffs[b];
      while (i < seg_end) {
        const int64_t n = std::min(kBlock, seg_end - i);
        const float* px = Block::load(x + i, bx, n);
        const float* pm = Block::load(m + i, bm, n);
        const float* pp = p != nullptr ? Block::load(p + i, bp, n) : nullptr;
        float* px0 = pred != nullptr ? Block::out(pred + i, b0) : b0;
        float* po = Block::out(out + i, bo);
#define FASTDDPM_DPMPP_CASE(PT)                                 \
  if (pp != nullptr) {                                          \
    dpmpp_block<PT, true>(px, pm, pp, po, px0, c, clip, n);     \
  } else {                                                      \
    dpmpp_block<PT, false>(px, pm, pp, po, px0, c, clip, n);    \
  }
        if (prediction_type == kEpsilon) {
          FASTDDPM_DPMPP_CASE(kEpsilon)
        } else if (prediction_type == kSample) {
          FASTDDPM_DPMPP_CASE(kSample)
        } else {
          FASTDDPM_DPMPP_CASE(kVPrediction)
        }
#undef FASTDDPM_DPMPP_CASE
        if (pred != nullptr) Block::store(pred + i, px0, n);
        Block::store(out + i, po, n);
        i += n;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dpmpp_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const c10::optional<at::Tensor>& prev_x0,
    const at::Tensor& t, const at::Tensor& prev_t, const c10::optional<at::Tensor>& last_t,
    const at::Tensor& alphas_cumprod, int64_t prediction_type, double clip_range, bool return_pred) {
  check_dpmpp_step_args(sample, model_output, prev_x0, t, prev_t, last_t, alphas_cumprod, prediction_type);
  const bool second = prev_x0.has_value() && prev_x0->defined();

  const int64_t B = sample.size(0);
  const int64_t T = alphas_cumprod.size(0);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const auto lc = second ? last_t->contiguous() : at::Tensor();
  const float* abar = ac.data_ptr<float>();
  std::vector<DpmppCoeffs> coeffs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tb = tc.data_ptr<int64_t>()[b], pb = pc.data_ptr<int64_t>()[b];
    check_step_timestep_values(tb, pb, T, b);
    int64_t lb = tb;
    if (second) {
      lb = lc.data_ptr<int64_t>()[b];
      TORCH_CHECK(lb > tb && lb < T, "last_t: expected t (", tb, ") < last_t < ", T, ", got ", lb, " at index ",
                  b);
    }
    coeffs[b] = dpmpp_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : 1.0f, abar[lb], pb < 0, second);
  }
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

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("dpmpp_step", &dpmpp_step_cpu); }

}  // namespace fastddpm
