// Per-element math of dpmpp_step: one update of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++",
// Algorithm 2, the multistep second-order solver in data prediction; diffusers'
// DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_type="midpoint").
// Host and device: the CPU kernel, the CUDA kernel and csrc/tests use these functions.
//
// With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), stepping from s0 (where the
// model ran, x0 prediction D0) to t, with the previous step's x0 prediction D_1 made at s1:
//   h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1, r0 = h_0 / h
//   first order:  x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0
//   second order: x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) (D0 + (D0 - D_1) / (2 r0))
// A step to t < 0 goes to sigma = 0 (diffusers' final_sigmas_type="zero"), where the first-order
// update is x0 itself; diffusers takes that last step first order, and so does this op.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastddpm/elementwise.h"

namespace fastddpm {

struct DpmppCoeffs {
  float sqrt_ab;      // alpha_s0, to convert the model output to x0
  float sqrt_1mab;    // sigma_s0
  float inv_sqrt_ab;  // 1 / alpha_s0
  float c_x;          // sigma_t / sigma_s0: coefficient of x_s0
  float c_x0;         // coefficient of D0 (the clipped x0 prediction at s0)
  float c_prev;       // coefficient of D_1 (0 for the first-order update)
};

// lambda_b - lambda_a for abar_b > abar_a, written so that nothing cancels: with d = abar_b - abar_a
// (an exact subtraction where the two are within a factor of 2, Sterbenz),
// lambda_b - lambda_a = (log(abar_b / abar_a) + log((1 - abar_a) / (1 - abar_b))) / 2
//                     = (log1p(d / abar_a) + log1p(d / (1 - abar_b))) / 2,
// two positive terms. The direct difference of two lambdas loses about log2(|lambda| / h) bits when
// many steps make h small (5e-6 relative at t = 500 of 1000 steps: csrc/tests/test_elementwise.cpp).
FASTDDPM_HD float dpmpp_lambda_diff(float ab_a, float ab_b) {
  const float d = ab_b - ab_a;
  return 0.5f * (log1pf(d / ab_a) + log1pf(d / (1.0f - ab_b)));
}

// ab_s0 = abar at the current timestep; ab_t = abar at the target (ignored when final: sigma_t = 0);
// ab_s1 = abar at the previous model evaluation (used when second_order).
FASTDDPM_HD DpmppCoeffs dpmpp_step_coeffs(float ab_s0, float ab_t, float ab_s1, bool final, bool second_order) {
  DpmppCoeffs c;
  c.sqrt_ab = sqrtf(ab_s0);
  c.sqrt_1mab = sqrtf(1.0f - ab_s0);
  c.inv_sqrt_ab = 1.0f / c.sqrt_ab;
  if (final) {
    c.c_x = 0.0f;
    c.c_x0 = 1.0f;
    c.c_prev = 0.0f;
    return c;
  }
  const float h = dpmpp_lambda_diff(ab_s0, ab_t);
  const float k = -sqrtf(ab_t) * expm1f(-h);  // alpha_t (1 - e^{-h}) > 0
  c.c_x = sqrtf((1.0f - ab_t) / (1.0f - ab_s0));
  if (second_order) {
    const float half_inv_r0 = 0.5f * h / dpmpp_lambda_diff(ab_s1, ab_s0);  // 1 / (2 r0)
    c.c_x0 = k * (1.0f + half_inv_r0);
    c.c_prev = -k * half_inv_r0;
  } else {
    c.c_x0 = k;
    c.c_prev = 0.0f;
  }
  return c;
}

// x0 from the model output (epsilon, sample or v), clipped to [-clip_range, clip_range] when clip_range > 0
// (DPM-Solver++'s thresholding of the data prediction, with a static threshold): elementwise.h's pred_x0.
template <typename V>
FASTDDPM_HD V dpmpp_x0(V x, V m, const DpmppCoeffs& c, int64_t prediction_type, float clip_range) {
  return pred_x0(x, m, c, prediction_type, clip_range);
}

template <typename V>
FASTDDPM_HD V dpmpp_update(V x, V x0, V prev_x0, const DpmppCoeffs& c) {
  return V(c.c_x) * x + V(c.c_x0) * x0 + V(c.c_prev) * prev_x0;
}

}  // namespace fastddpm
