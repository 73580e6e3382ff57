// ddpm_step on the CPU: predicted x0, optional clip, posterior mean and sigma_t z
// in one pass. With noise_mode 2 the normals are generated in the loop (Philox,
// then a vectorised Box-Muller), so z never touches memory.
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

struct StepArgs {
  int64_t noise_mode, prediction_type, variance_type;
  float clip_range;
  uint64_t seed, offset;
};

template <typename scalar_t>
void ddpm_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* z, const scalar_t* pv,
                    scalar_t* out, scalar_t* pred, const std::vector<StepCoeffs>& coeffs,
                    const StepArgs& a, int64_t B, int64_t M) {
  using Block = FloatBlock<scalar_t>;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float bx[kBlock], bm[kBlock], bz[kBlock], bp[kBlock], bo[kBlock], b0[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      const StepCoeffs c = coeffs[b];
      while (i < seg_end) {
        const int64_t n = std::min(kBlock, seg_end - i);
        const float* px = Block::load(x + i, bx, n);
        const float* pm = Block::load(m + i, bm, n);
        float* px0 = pred != nullptr ? Block::out(pred + i, b0) : b0;
        float* po = Block::out(out + i, bo);
        const bool noisy = c.add_noise && a.noise_mode != kNoNoise;
        const float* pz = nullptr;
        if (noisy) {
          if (a.noise_mode == kNoiseTensor) {
            pz = Block::load(z + i, bz, n);
          } else {
            philox_normal_block(a.seed, a.offset + static_cast<uint64_t>(i), n, bz);
            pz = bz;
          }
        }
        const bool learned = a.variance_type == kLearned || a.variance_type == kLearnedRange;
        // One pass: predicted x0 (diffusers step 2), clip (3), posterior mean (4-5) and,
        // for the fixed variance types, + sigma_t z (6). Learned sigma is added below.
        const bool add_fixed = noisy && !learned;
        const Vec sab(c.sqrt_ab), s1m(c.sqrt_1mab), isab(c.inv_sqrt_ab), cx0(c.c_x0), cxt(c.c_xt), sd(c.std);
        const bool clip = a.clip_range > 0.0f;
        const Vec lo(-a.clip_range), hi(a.clip_range);
        const int64_t pt = a.prediction_type;
        auto x0_of = [&](Vec xv, Vec mv) {
          Vec x0 = pt == kEpsilon ? (xv - s1m * mv) * isab : (pt == kSample ? mv : sab * xv - s1m * mv);
          return clip ? at::vec::clamp(x0, lo, hi) : x0;
        };
        int64_t j = 0;
        constexpr int64_t W = Vec::size();
        if (add_fixed) {
          for (; j + W <= n; j += W) {
            const Vec xv = Vec::loadu(px + j), x0 = x0_of(xv, Vec::loadu(pm + j));
            x0.store(px0 + j);
            at::vec::fmadd(sd, Vec::loadu(pz + j), at::vec::fmadd(cx0, x0, cxt * xv)).store(po + j);
          }
        } else {
          for (; j + W <= n; j += W) {
            const Vec xv = Vec::loadu(px + j), x0 = x0_of(xv, Vec::loadu(pm + j));
            x0.store(px0 + j);
            at::vec::fmadd(cx0, x0, cxt * xv).store(po + j);
          }
        }
        if (j < n) {  // the tail, through the same vector code on a partial load
          const int64_t r = n - j;
          const Vec xv = Vec::loadu(px + j, r), x0 = x0_of(xv, Vec::loadu(pm + j, r));
          x0.store(px0 + j, r);
          Vec o = at::vec::fmadd(cx0, x0, cxt * xv);
          if (add_fixed) o = at::vec::fmadd(sd, Vec::loadu(pz + j, r), o);
          o.store(po + j, r);
        }
        if (noisy && learned) {
          const float* pp = Block::load(pv + i, bp, n);
          for (int64_t k = 0; k < n; ++k) po[k] += ddpm_sigma(c, a.variance_type, pp[k]) * pz[k];
        }
        if (pred != nullptr) Block::store(pred + i, px0, n);
        Block::store(out + i, po, n);
        i += n;
      }
    }
  });
}

// The per-sample coefficients, with t and prev_t range-checked.
std::vector<StepCoeffs> step_coeffs(const at::Tensor& t, const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                                    int64_t variance_type, int64_t B, bool diffusers_beta) {
  const int64_t T = alphas_cumprod.size(0);
  const auto tc = t.contiguous(), pc = prev_t.contiguous(), ac = alphas_cumprod.contiguous();
  const float* abar = ac.data_ptr<float>();
  std::vector<StepCoeffs> coeffs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tb = tc.data_ptr<int64_t>()[b], pb = pc.data_ptr<int64_t>()[b];
    check_step_timestep_values(tb, pb, T, b);  // any prev_t < 0: abar_prev = 1
    coeffs[b] = ddpm_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : 1.0f, variance_type, tb > 0, diffusers_beta);
  }
  return coeffs;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
    const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& predicted_variance,
    int64_t seed, int64_t offset, int64_t noise_mode, int64_t prediction_type,
    int64_t variance_type, double clip_range, bool return_pred, const c10::optional<at::Tensor>& offset_tensor,
    bool diffusers_beta) {
  check_ddpm_step_args(sample, model_output, t, prev_t, alphas_cumprod, noise, predicted_variance, seed, offset,
                       noise_mode, prediction_type, variance_type);
  if (noise_mode == kNoisePhilox) offset = philox_offset(offset, offset_tensor, sample);

  const int64_t B = sample.size(0);
  const std::vector<StepCoeffs> coeffs = step_coeffs(t, prev_t, alphas_cumprod, variance_type, B, diffusers_beta);

  // Philox noise is indexed by the row-major (NCHW) position, so layouts other
  // than contiguous go through a contiguous copy to keep the numbers layout-free.
  const at::Tensor& noise_t = noise_mode == kNoiseTensor ? *noise : at::Tensor();
  const at::Tensor& pv_t = is_learned_variance(variance_type) ? *predicted_variance : at::Tensor();
  const StepLayout io({sample, model_output, noise_t, pv_t}, /*row_major=*/noise_mode == kNoisePhilox);
  const at::Tensor ms = io.in(model_output), zs = io.in(noise_t), ps = io.in(pv_t);
  auto [out, pred] = io.outputs(return_pred);
  const StepArgs args{noise_mode, prediction_type, variance_type, static_cast<float>(clip_range),
                      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  if (io.has_elements()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddpm_step_cpu", [&] {
      ddpm_step_loop<scalar_t>(io.first().data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(),
                               data_or_null<scalar_t>(zs), data_or_null<scalar_t>(ps), out.data_ptr<scalar_t>(),
                               return_pred ? pred.data_ptr<scalar_t>() : nullptr, coeffs, args, B,
                               io.per_sample());
    });
  }
  return io.finish(out, pred, return_pred);
}

// Below this many elements the draw is short and a second thread does not pay.
constexpr int64_t kOverlapMin = 4096;

std::tuple<at::Tensor, at::Tensor> ddpm_step_randn_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& t,
    const at::Tensor& prev_t, const at::Tensor& alphas_cumprod, const c10::optional<at::Generator>& generator,
    int64_t prediction_type, int64_t variance_type, double clip_range, bool return_pred, bool diffusers_beta) {
  // Checked before the draw, so that a refused call leaves the generator as it was.
  check_ddpm_step_randn_args(sample, model_output, t, prev_t, alphas_cumprod, generator, prediction_type,
                             variance_type);
  // z exactly as torch.randn(sample.shape, generator=generator, dtype=sample.dtype): a
  // contiguous tensor filled by torch's normal_, which also advances the generator as it does.
  at::Tensor z = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  const bool overlap = sample.scalar_type() == at::kFloat && sample.is_contiguous() &&
                       model_output.is_contiguous() && sample.numel() >= kOverlapMin &&
                       at::get_num_threads() > 1 && !at::in_parallel_region();
  if (!overlap) {
    z.normal_(0.0, 1.0, generator);
    return ddpm_step_cpu(sample, model_output, t, prev_t, alphas_cumprod, z, c10::nullopt, 0, 0, kNoiseTensor,
                         prediction_type, variance_type, clip_range, return_pred, c10::nullopt, diffusers_beta);
  }
  const int64_t B = sample.size(0), M = sample.numel() / B;
  const std::vector<StepCoeffs> coeffs = step_coeffs(t, prev_t, alphas_cumprod, variance_type, B, diffusers_beta);
  at::Tensor out = at::empty_like(sample);
  at::Tensor pred = return_pred ? at::empty_like(sample) : at::empty({0}, sample.options());
  const float* x = sample.data_ptr<float>();
  const float* m = model_output.data_ptr<float>();
  float* po = out.data_ptr<float>();
  float* pp = return_pred ? pred.data_ptr<float>() : nullptr;
  const StepArgs mean_only{kNoNoise, prediction_type, variance_type, static_cast<float>(clip_range), 0, 0};
  // Task 0 runs on the calling thread (OpenMP's thread 0), so torch's normal_ sees the
  // caller's thread-local state; task 1 computes x0, the clip and the posterior mean
  // (ddpm_step_loop's parallel_for runs inline inside this region).
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (task == 0) {
        z.normal_(0.0, 1.0, generator);
      } else {
        ddpm_step_loop<float>(x, m, nullptr, nullptr, po, pp, coeffs, mean_only, B, M);
      }
    }
  });
  // + sigma_t z where t > 0: the same fmadd on the same mean as ddpm_step's one pass, so
  // the result is bit for bit that of ddpm_step with this z as the noise tensor.
  const float* pz = z.data_ptr<float>();
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      if (coeffs[b].add_noise) {
        const Vec sd(coeffs[b].std);
        int64_t j = i;
        for (; j + Vec::size() <= seg_end; j += Vec::size()) {
          at::vec::fmadd(sd, Vec::loadu(pz + j), Vec::loadu(po + j)).store(po + j);
        }
        if (j < seg_end) {
          const int64_t r = seg_end - j;
          at::vec::fmadd(sd, Vec::loadu(pz + j, r), Vec::loadu(po + j, r)).store(po + j, r);
        }
      }
      i = seg_end;
    }
  });
  return {out, pred};
}

void philox_normal_cpu(const at::Tensor& out, int64_t seed, int64_t offset) {
  check_philox_normal_args(out, seed, offset);
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kBlock) {
      philox_normal_block(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + i),
                          std::min(kBlock, end - i), p + i);
    }
  });
}

void philox_bits_cpu(const at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.dim() == 2 &&
                  out.size(1) == 4,
              "out: expected a contiguous int32 tensor of shape (n, 4)");
  check_seed_offset(seed, offset);
  auto* p = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  for (int64_t i = 0; i < out.size(0); ++i) {
    const uint64_t ctr = static_cast<uint64_t>(offset + i);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    p[4 * i] = c0;
    p[4 * i + 1] = c1;
    p[4 * i + 2] = c2;
    p[4 * i + 3] = c3;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddpm_step_randn", &ddpm_step_randn_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("philox_bits_", &philox_bits_cpu);
}

}  // namespace fastddpm
