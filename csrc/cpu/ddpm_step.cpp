// ddpm_step on the CPU: predicted x0, optional clip, posterior mean and sigma_t z
// in one pass. With noise_mode 2 the normals are generated in the loop (Philox,
// then a vectorised Box-Muller), so z never touches memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_step.h"
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

// Which noise term a block adds: none (t = 0 or no noise), sigma_t of a fixed variance type, or the
// learned sigma of the predicted-variance channel.
enum class NoiseTerm { kNone, kFixed, kLearned };

// One block of n elements of one sample: elementwise.h's ddpm_pred_x0 (diffusers' steps 2-3), posterior
// mean and noise (4-6) on vectors, the functions the CUDA kernel runs per element. c.add_noise is set as
// the term says.
// The coefficients are copied into the block (cb: a local whose address the stores through po/px0 cannot
// reach, so the compiler keeps its fields in registers instead of reloading them after every store), and a
// fixed sigma_t, the same for every element, is evaluated once per block.
template <NoiseTerm N>
inline void ddpm_block(const float* px, const float* pm, const float* pz, const float* pp, float* po, float* px0,
                       const StepCoeffs& c, const StepArgs& a, int64_t n) {
  const StepCoeffs cb = c;
  const int64_t pt = a.prediction_type, vt = a.variance_type;
  const float clip = a.clip_range;
  const Vec fixed_sigma = N == NoiseTerm::kFixed ? ddpm_sigma(cb, vt, Vec(0.0f)) : Vec(0.0f);
  for_each_vec(n, [&](int64_t j, int64_t r) {
    const Vec xv = Vec::loadu(px + j, r);
    const Vec x0 = ddpm_pred_x0(xv, Vec::loadu(pm + j, r), cb, pt, clip);
    x0.store(px0 + j, r);
    Vec sigma(0.0f), z(0.0f);
    if constexpr (N != NoiseTerm::kNone) {
      z = Vec::loadu(pz + j, r);
      sigma = N == NoiseTerm::kLearned ? ddpm_sigma(cb, vt, Vec::loadu(pp + j, r)) : fixed_sigma;
    }
    ddpm_prev_sample(xv, x0, sigma, z, cb).store(po + j, r);
  });
}

template <typename scalar_t>
void ddpm_step_loop(const scalar_t* x, const scalar_t* m, const scalar_t* z, const scalar_t* pv,
                    scalar_t* out, scalar_t* pred, const std::vector<StepCoeffs>& coeffs,
                    const StepArgs& a, int64_t B, int64_t M) {
  using Block = FloatBlock<scalar_t>;
  const bool learned = a.variance_type == kLearned || a.variance_type == kLearnedRange;
  for_each_sample_block(B, M, kGrain, [&](int64_t b, int64_t i, int64_t n) {
    StepBlock<scalar_t> k(x, m, out, pred, i, n);
    StepCoeffs c = coeffs[b];
    c.add_noise = c.add_noise && a.noise_mode != kNoNoise;  // as the CUDA kernel
    if (!c.add_noise) {
      ddpm_block<NoiseTerm::kNone>(k.px, k.pm, nullptr, nullptr, k.po, k.px0, c, a, n);
    } else {
      const float* pz = k.noise(z, a.noise_mode, a.seed, a.offset);
      if (learned) {
        alignas(64) float bp[kBlock];
        ddpm_block<NoiseTerm::kLearned>(k.px, k.pm, pz, Block::load(pv + i, bp, n), k.po, k.px0, c, a, n);
      } else {
        ddpm_block<NoiseTerm::kFixed>(k.px, k.pm, pz, nullptr, k.po, k.px0, c, a, n);
      }
    }
    k.finish();
  });
}

// The per-sample coefficients, with t and prev_t range-checked.
std::vector<StepCoeffs> step_coeffs(const at::Tensor& t, const at::Tensor& prev_t, const at::Tensor& alphas_cumprod,
                                    int64_t variance_type, bool diffusers_beta) {
  return host_step_coeffs(t, prev_t, alphas_cumprod, [&](int64_t, int64_t tb, int64_t pb, const float* abar) {
    // any prev_t < 0: abar_prev = 1
    return ddpm_step_coeffs(abar[tb], pb >= 0 ? abar[pb] : 1.0f, variance_type, tb > 0, diffusers_beta);
  });
}

// The arguments are checked by ddpm_step_op (checks.h).
TensorPair ddpm_step_cpu(DdpmStepArgs a) {
  auto& [sample, model_output, t, prev_t, alphas_cumprod, noise, predicted_variance, seed, offset, noise_mode,
         prediction_type, variance_type, clip_range, return_pred, offset_tensor, diffusers_beta] = a;
  if (noise_mode == kNoisePhilox) offset = philox_offset(offset, offset_tensor, sample);

  const int64_t B = sample.size(0);
  const std::vector<StepCoeffs> coeffs = step_coeffs(t, prev_t, alphas_cumprod, variance_type, diffusers_beta);

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
    const OptTensor noise(z), none;
    return ddpm_step_cpu({sample, model_output, t, prev_t, alphas_cumprod, noise, none, 0, 0, kNoiseTensor,
                          prediction_type, variance_type, clip_range, return_pred, none, diffusers_beta});
  }
  const int64_t B = sample.size(0), M = sample.numel() / B;
  const std::vector<StepCoeffs> coeffs = step_coeffs(t, prev_t, alphas_cumprod, variance_type, diffusers_beta);
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
  // + sigma_t z where t > 0: ddpm_add_noise on the same mean as ddpm_step's one pass, so
  // the result is bit for bit that of ddpm_step with this z as the noise tensor.
  const float* pz = z.data_ptr<float>();
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      const StepCoeffs& c = coeffs[b];
      if (c.add_noise) {
        const Vec sd = ddpm_sigma(c, variance_type, Vec(0.0f));  // a fixed variance type: sigma_t
        float* o = po + i;
        const float* zi = pz + i;
        for_each_vec(seg_end - i, [&](int64_t j, int64_t r) {
          ddpm_add_noise(Vec::loadu(o + j, r), sd, Vec::loadu(zi + j, r), c).store(o + j, r);
        });
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
  m.impl("ddpm_step", &ddpm_step_op<ddpm_step_cpu>);
  m.impl("ddpm_step_randn", &ddpm_step_randn_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("philox_bits_", &philox_bits_cpu);
}

}  // namespace fastddpm
