// ddim_step on the CPU: predicted x0 and eps, optional clip, the DDIM update and
// sigma z in one pass (Song et al. 2021, eq. 12, as diffusers' DDIMScheduler.step).
// The per-element math is ddim_mean in elementwise.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"
#include "fastddpm/philox_cpu.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 16384;

struct DdimArgs {
  int64_t noise_mode, prediction_type;
  float clip_range;
  bool use_clipped, add_noise;
  uint64_t seed, offset;
};

// One block of n elements of sample b; the branch on prediction type is hoisted
// out of the element loop by the template so the loop vectorises.
template <int64_t PT, bool UseClipped>
inline void ddim_block(const float* px, const float* pm, float* po, float* px0, const DdimCoeffs& c, float clip,
                       int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float x0;
    po[j] = ddim_mean(px[j], pm[j], c, PT, clip, UseClipped, &x0);
    px0[j] = x0;
  }
}

template <typename scalar_t>
void ddim_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* z, scalar_t* out, scalar_t* pred,
                    const std::vector<DdimCoeffs>& coeffs, const DdimArgs& a, int64_t B, int64_t M) {
  using Block = FloatBlock<scalar_t>;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float bx[kBlock], bm[kBlock], bz[kBlock], bo[kBlock], b0[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      const DdimCoeffs c = coeffs[b];
      while (i < seg_end) {
        const int64_t n = std::min(kBlock, seg_end - i);
        const float* px = Block::load(x + i, bx, n);
        const float* pm = Block::load(m + i, bm, n);
        float* px0 = pred != nullptr ? Block::out(pred + i, b0) : b0;
        float* po = Block::out(out + i, bo);
#define FASTDDPM_DDIM_CASE(PT)                                          \
  if (a.use_clipped) {                                                  \
    ddim_block<PT, true>(px, pm, po, px0, c, a.clip_range, n);          \
  } else {                                                              \
    ddim_block<PT, false>(px, pm, po, px0, c, a.clip_range, n);         \
  }
        if (a.prediction_type == kEpsilon) {
          FASTDDPM_DDIM_CASE(kEpsilon)
        } else if (a.prediction_type == kSample) {
          FASTDDPM_DDIM_CASE(kSample)
        } else {
          FASTDDPM_DDIM_CASE(kVPrediction)
        }
#undef FASTDDPM_DDIM_CASE
        if (pred != nullptr) Block::store(pred + i, px0, n);
        if (a.add_noise) {
          const float* pz;
          if (a.noise_mode == kNoiseTensor) {
            pz = Block::load(z + i, bz, n);
          } else {
            philox_normal_block(a.seed, a.offset + static_cast<uint64_t>(i), n, bz);
            pz = bz;
          }
          const Vec sd(c.std);
          at::vec::map2([=](Vec o, Vec zv) { return o + sd * zv; }, po, po, pz, n);
        }
        Block::store(out + i, po, n);
        i += n;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& prev_t,
    const at::Tensor& alphas_cumprod, double final_alpha_cumprod, const c10::optional<at::Tensor>& noise,
    int64_t seed, int64_t offset, int64_t noise_mode, int64_t prediction_type, double eta, double clip_range,
    bool use_clipped_model_output, bool return_pred, const c10::optional<at::Tensor>& offset_tensor,
    bool diffusers_beta) {
  check_ddim_step_args(sample, model_output, t, prev_t, alphas_cumprod, final_alpha_cumprod, noise, seed, offset,
                       noise_mode, prediction_type, eta);
  const int64_t mode = ddim_noise_mode(noise_mode, eta);
  if (mode == kNoisePhilox) offset = philox_offset(offset, offset_tensor, sample);

  const int64_t B = sample.size(0);
  const int64_t T = alphas_cumprod.size(0);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const float* abar = ac.data_ptr<float>();
  std::vector<DdimCoeffs> coeffs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tb = tc.data_ptr<int64_t>()[b], pb = pc.data_ptr<int64_t>()[b];
    check_step_timestep_values(tb, pb, T, b);
    coeffs[b] = ddim_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : static_cast<float>(final_alpha_cumprod),
                                 static_cast<float>(eta), diffusers_beta);
  }
  // As ddpm_step: Philox noise is indexed by the row-major position, so other layouts go
  // through a contiguous copy.
  const at::Tensor& noise_t = mode == kNoiseTensor ? *noise : at::Tensor();
  const StepLayout io({sample, model_output, noise_t}, /*row_major=*/mode == kNoisePhilox);
  const at::Tensor ms = io.in(model_output), zs = io.in(noise_t);
  auto [out, pred] = io.outputs(return_pred);
  const DdimArgs args{noise_mode, prediction_type, static_cast<float>(clip_range), use_clipped_model_output,
                      eta > 0.0 && noise_mode != kNoNoise, static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset)};
  if (io.has_elements()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddim_step_cpu", [&] {
      ddim_step_loop<scalar_t>(io.first().data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(), data_or_null<scalar_t>(zs),
                               out.data_ptr<scalar_t>(), return_pred ? pred.data_ptr<scalar_t>() : nullptr, coeffs,
                               args, B, io.per_sample());
    });
  }
  return io.finish(out, pred, return_pred);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("ddim_step", &ddim_step_cpu); }

}  // namespace fastddpm
