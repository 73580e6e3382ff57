// Per-element math of the fused elementwise ops (q_sample, ddpm_step, ddim_step,
// GroupNorm + SiLU) and the in-kernel Philox4x32-10 normal generator. Host and device: the CPU kernels,
// the CUDA kernels and the C++ unit tests (csrc/tests) all evaluate these functions,
// so the CPU tests cover the formulas the GPU runs.
//
// The formulas are templates on the value type V: float in the CUDA kernels and csrc/tests, and the CPU's
// SIMD vector (at::vec::Vectorized<float>, whose ValueOps are in cpu_vec.h) in the CPU kernels, so one
// expression serves both. Coefficients stay float and are broadcast with V(c).
//
// No torch headers here: the CUDA translation units include this file without
// pulling in ATen, which keeps nvcc fast.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDDPM_HD __host__ __device__ __forceinline__
#else
#define FASTDDPM_HD inline
#endif

namespace fastddpm {

// Integer codes shared with Python (fastddpm/ops/_codes.py mirrors them).
enum PredictionType : int64_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum VarianceType : int64_t {
  kFixedSmall = 0,     // sigma_t^2 = posterior variance (Ho et al. eq. 7)
  kFixedSmallLog = 1,  // same, through exp(0.5 log var) as diffusers does
  kFixedLarge = 2,     // sigma_t^2 = beta_t
  kLearned = 4,        // sigma_t^2 = model's predicted variance
  kLearnedRange = 5,   // log sigma_t^2 interpolated between the two (Nichol & Dhariwal)
};
enum NoiseMode : int64_t { kNoNoise = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

// What the formulas need beyond + - *, per value type. float here; cpu_vec.h specialises it for the
// CPU's vectors (at::vec's fmadd, clamp, sqrt, exp).
template <typename V>
struct ValueOps;

template <>
struct ValueOps<float> {
  // One rounding where the hardware fuses (every GPU; CPU builds with FMA, like at::vec::fmadd there).
  static FASTDDPM_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
  }
  // NaN stays NaN, as with at::vec::clamp.
  static FASTDDPM_HD float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
  static FASTDDPM_HD float sqrt(float x) { return sqrtf(x); }
  static FASTDDPM_HD float exp(float x) { return expf(x); }
};

// ---------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011), with the exact conventions of Triton's
// tl.randn(seed, offset): counter = (offset_lo, offset_hi, 0, 0), key =
// (seed_lo, seed_hi), first two words -> uniforms -> one Box-Muller normal.
// ---------------------------------------------------------------------------
FASTDDPM_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FASTDDPM_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                               uint32_t k0, uint32_t k1) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = umulhi32(kRoundB, p2) ^ c1 ^ k0;
    c2 = umulhi32(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// Triton's uint_to_uniform_float for 32-bit words: [0, 1).
FASTDDPM_HD float uint_to_uniform(uint32_t x) {
  int32_t xi = static_cast<int32_t>(x);
  if (xi < 0) xi = ~xi;
  return static_cast<float>(xi) * 4.6566127342e-10f;
}

// The standard normal of element `offset` of stream `seed`.
FASTDDPM_HD float philox_normal(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  float u1 = uint_to_uniform(c0);
  const float u2 = uint_to_uniform(c1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

// ---------------------------------------------------------------------------
// q_sample (Ho et al. eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
// and the v target (Salimans & Ho 2022): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
// ---------------------------------------------------------------------------
template <typename V>
FASTDDPM_HD V q_sample_xt(V x0, V eps, V sqrt_ab, V sqrt_1mab) {
  return sqrt_ab * x0 + sqrt_1mab * eps;
}
template <typename V>
FASTDDPM_HD V q_sample_v(V x0, V eps, V sqrt_ab, V sqrt_1mab) {
  return sqrt_ab * eps - sqrt_1mab * x0;
}

// ---------------------------------------------------------------------------
// ddpm_step: diffusers' DDPMScheduler.step, i.e. the posterior q(x_{t-1} | x_t, x0)
// of Ho et al. eqs. 6-7 evaluated at the predicted x0.
//
// Coefficients depend only on (abar_t, abar_prev), so kernels compute them once
// per sample. Differences such as 1 - abar_t / abar_prev are written as
// (abar_prev - abar_t) / abar_prev: the subtraction of two nearby floats is exact
// (Sterbenz), so fp32 coefficients stay within a few ulp of the float64 values
// even where beta_t ~ 1e-4.
// ---------------------------------------------------------------------------
struct StepCoeffs {
  float sqrt_ab;        // sqrt(abar_t)
  float sqrt_1mab;      // sqrt(1 - abar_t)
  float inv_sqrt_ab;    // 1 / sqrt(abar_t)
  float c_x0;           // posterior mean coefficient of x0 (eq. 7)
  float c_xt;           // posterior mean coefficient of x_t (eq. 7)
  float std;            // sigma_t for the fixed variance types
  float log_var_small;  // log posterior variance (learned_range)
  float log_var_large;  // log beta_t (learned_range)
  bool add_noise;       // t > 0
};

// beta_t = 1 - alpha_t as diffusers evaluates it in fp32, 1 - abar_t / abar_prev: the subtraction cancels, and
// where beta_t ~ 1e-4 it is off by up to ~5e-4 (relative), which moves a whole loop's numbers by ~5e-5. The
// diffusers drop-in schedulers ask for it (diffusers_beta) so that they return diffusers' own numbers;
// otherwise the exact form (abar_prev - abar_t) / abar_prev.
FASTDDPM_HD float step_beta(float ab_t, float ab_prev, bool diffusers_beta) {
  return diffusers_beta ? 1.0f - ab_t / ab_prev : (ab_prev - ab_t) / ab_prev;
}

// ab_t = abar_t; ab_prev = abar_{prev_t}, or 1 where prev_t < 0.
FASTDDPM_HD StepCoeffs ddpm_step_coeffs(float ab_t, float ab_prev, int64_t variance_type,
                                        bool add_noise, bool diffusers_beta = false) {
  StepCoeffs c;
  const float beta_prod_t = 1.0f - ab_t;
  const float beta_prod_prev = 1.0f - ab_prev;
  const float cur_beta = step_beta(ab_t, ab_prev, diffusers_beta);  // 1 - alpha_t
  const float cur_alpha = ab_t / ab_prev;                             // alpha_t
  c.sqrt_ab = sqrtf(ab_t);
  c.sqrt_1mab = sqrtf(beta_prod_t);
  c.inv_sqrt_ab = 1.0f / c.sqrt_ab;
  c.c_x0 = sqrtf(ab_prev) * cur_beta / beta_prod_t;
  c.c_xt = sqrtf(cur_alpha) * beta_prod_prev / beta_prod_t;
  float var = beta_prod_prev / beta_prod_t * cur_beta;  // posterior variance, eq. 7
  var = var > 1e-20f ? var : 1e-20f;
  c.log_var_small = logf(var);
  c.log_var_large = logf(cur_beta > 1e-20f ? cur_beta : 1e-20f);
  if (variance_type == kFixedLarge) {
    c.std = sqrtf(cur_beta);
  } else {
    c.std = sqrtf(var);
  }
  c.add_noise = add_noise;
  return c;
}

// x0 from the model output m at x_t (diffusers' step 2; epsilon: Ho et al. eq. 15; v: Salimans & Ho 2022),
// clipped to [-clip_range, clip_range] when clip_range > 0 (step 3). C: any coefficient struct with sqrt_ab,
// sqrt_1mab and inv_sqrt_ab of abar_t (StepCoeffs, DdimCoeffs, DpmppCoeffs).
template <typename V, typename C>
FASTDDPM_HD V pred_x0(V x, V m, const C& c, int64_t prediction_type, float clip_range) {
  V x0;
  if (prediction_type == kEpsilon) {
    x0 = (x - V(c.sqrt_1mab) * m) * V(c.inv_sqrt_ab);
  } else if (prediction_type == kSample) {
    x0 = m;
  } else {
    x0 = V(c.sqrt_ab) * x - V(c.sqrt_1mab) * m;
  }
  return clip_range > 0.0f ? ValueOps<V>::clamp(x0, V(-clip_range), V(clip_range)) : x0;
}

template <typename V>
FASTDDPM_HD V ddpm_pred_x0(V x, V m, const StepCoeffs& c, int64_t prediction_type, float clip_range) {
  return pred_x0(x, m, c, prediction_type, clip_range);
}

// sigma_t for one element; pv is the model's predicted variance channel
// (learned: sigma^2 itself; learned_range: a value in [-1, 1]).
template <typename V>
FASTDDPM_HD V ddpm_sigma(const StepCoeffs& c, int64_t variance_type, V pv) {
  if (variance_type == kLearned) return ValueOps<V>::sqrt(pv);
  if (variance_type == kLearnedRange) {
    const V frac = V(0.5f) * (pv + V(1.0f));
    return ValueOps<V>::exp(V(0.5f) * (frac * V(c.log_var_large) + (V(1.0f) - frac) * V(c.log_var_small)));
  }
  return V(c.std);
}

// The posterior mean of eq. 7 at the predicted x0 (diffusers' steps 4-5).
template <typename V>
FASTDDPM_HD V ddpm_posterior_mean(V x, V x0, const StepCoeffs& c) {
  return ValueOps<V>::fmadd(V(c.c_x0), x0, V(c.c_xt) * x);
}

// + sigma z where c.add_noise (t > 0 and noise asked for; step 6).
template <typename V>
FASTDDPM_HD V ddpm_add_noise(V mean, V sigma, V z, const StepCoeffs& c) {
  return c.add_noise ? ValueOps<V>::fmadd(sigma, z, mean) : mean;
}

// x_{t-1} from the predicted x0 and x_t, plus sigma z where c.add_noise.
template <typename V>
FASTDDPM_HD V ddpm_prev_sample(V x, V x0, V sigma, V z, const StepCoeffs& c) {
  return ddpm_add_noise(ddpm_posterior_mean(x, x0, c), sigma, z, c);
}

// ---------------------------------------------------------------------------
// ddim_step: diffusers' DDIMScheduler.step (Song et al. 2021, eq. 12):
// x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
// sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)).
// abar_prev is the caller's final_alpha_cumprod where prev_t < 0.
// ---------------------------------------------------------------------------
struct DdimCoeffs {
  float sqrt_ab;       // sqrt(abar_t)
  float sqrt_1mab;     // sqrt(1 - abar_t)
  float inv_sqrt_ab;   // 1 / sqrt(abar_t)
  float inv_sqrt_1mab; // 1 / sqrt(1 - abar_t)
  float sqrt_ab_prev;  // coefficient of x0
  float c_eps;         // sqrt(1 - abar_prev - sigma^2), clamped at 0, coefficient of eps
  float std;           // sigma
};

FASTDDPM_HD DdimCoeffs ddim_step_coeffs(float ab_t, float ab_prev, float eta, bool diffusers_beta = false) {
  DdimCoeffs c;
  const float beta_prod_t = 1.0f - ab_t;
  const float beta_prod_prev = 1.0f - ab_prev;
  const float cur_beta = step_beta(ab_t, ab_prev, diffusers_beta);  // as ddpm_step_coeffs
  float var = beta_prod_prev / beta_prod_t * cur_beta;
  var = var > 0.0f ? var : 0.0f;
  c.sqrt_ab = sqrtf(ab_t);
  c.sqrt_1mab = sqrtf(beta_prod_t);
  c.inv_sqrt_ab = 1.0f / c.sqrt_ab;
  c.inv_sqrt_1mab = 1.0f / c.sqrt_1mab;
  c.sqrt_ab_prev = sqrtf(ab_prev);
  c.std = eta * sqrtf(var);
  const float d = beta_prod_prev - c.std * c.std;
  c.c_eps = sqrtf(d > 0.0f ? d : 0.0f);
  return c;
}

// The deterministic part of the DDIM update for one element; x0 (clipped) goes to *x0_out.
template <typename V>
FASTDDPM_HD V ddim_mean(V x, V m, const DdimCoeffs& c, int64_t prediction_type, float clip_range,
                        bool use_clipped_model_output, V* x0_out) {
  const V x0 = pred_x0(x, m, c, prediction_type, clip_range);
  V eps;
  if (use_clipped_model_output) {
    eps = (x - V(c.sqrt_ab) * x0) * V(c.inv_sqrt_1mab);
  } else if (prediction_type == kEpsilon) {
    eps = m;
  } else if (prediction_type == kSample) {
    eps = (x - V(c.sqrt_ab) * m) * V(c.inv_sqrt_1mab);
  } else {
    eps = V(c.sqrt_ab) * m + V(c.sqrt_1mab) * x;
  }
  *x0_out = x0;
  return V(c.sqrt_ab_prev) * x0 + V(c.c_eps) * eps;
}

// ---------------------------------------------------------------------------
// GroupNorm + SiLU (group_norm_silu), per element: z = (x - mean) rstd w + b,
// y = silu(z) = z sigmoid(z); backward dL/dz = dy silu'(z) with
// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z). The CUDA kernels call these; the CPU
// kernel evaluates the same expressions on at::vec vectors (its own exp).
// ---------------------------------------------------------------------------
FASTDDPM_HD float fast_expf(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // the SFU's exp2 path: ~2 ulp, ample against fp32 GroupNorm's 1e-5
#else
  return std::exp(x);
#endif
}

FASTDDPM_HD float sigmoid(float z) { return 1.0f / (1.0f + fast_expf(-z)); }

FASTDDPM_HD float silu(float z) { return z * sigmoid(z); }

FASTDDPM_HD float silu_backward(float z, float dy) {
  const float s = sigmoid(z);
  return dy * s * (1.0f + z * (1.0f - s));
}

}  // namespace fastddpm
