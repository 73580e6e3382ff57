// Unit tests of the shared per-element math (csrc/include/fastddpm/elementwise.h)
// against independent values: Random123's known-answer vectors for Philox4x32-10
// and float64 evaluations of the paper's formulas.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "fastddpm/elementwise.h"

using namespace fastddpm;

static int failures = 0;
#define EXPECT(cond, ...)                            \
  do {                                               \
    if (!(cond)) {                                   \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                      \
      std::printf("\n");                             \
      ++failures;                                    \
    }                                                \
  } while (0)

static void test_philox_kat() {
  // Random123 kat_vectors: philox4x32 10 rounds.
  struct Kat { uint32_t ctr[4], key[2], out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) {
    uint32_t c0 = k.ctr[0], c1 = k.ctr[1], c2 = k.ctr[2], c3 = k.ctr[3];
    philox4x32_10(c0, c1, c2, c3, k.key[0], k.key[1]);
    EXPECT(c0 == k.out[0] && c1 == k.out[1] && c2 == k.out[2] && c3 == k.out[3],
           "philox KAT mismatch: got %08x %08x %08x %08x", c0, c1, c2, c3);
  }
}

static void test_philox_normal_moments() {
  // 2^20 normals: mean 0 and variance 1 within 5 standard errors.
  const int n = 1 << 20;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = philox_normal(1234, static_cast<uint64_t>(i));
    s += z;
    s2 += z * z;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT(std::fabs(mean) < 5.0 / std::sqrt(n), "mean %g", mean);
  EXPECT(std::fabs(var - 1.0) < 5.0 * std::sqrt(2.0 / n), "variance %g", var);
}

static double rel(double a, double b) { return std::fabs(a - b) / std::fmax(std::fabs(b), 1.0); }

static void test_q_sample() {
  const double ab = 0.3141592, x0 = -0.75, eps = 1.25;
  const double sa = std::sqrt(ab), s1 = std::sqrt(1 - ab);
  EXPECT(rel(q_sample_xt(x0, eps, sa, s1), sa * x0 + s1 * eps) < 1e-6, "x_t");
  EXPECT(rel(q_sample_v(x0, eps, sa, s1), sa * eps - s1 * x0) < 1e-6, "v");
}

static void test_ddpm_step_forms() {
  // The linear schedule of the paper, in float64.
  const int T = 1000;
  static double ab[T];
  double p = 1.0;
  for (int i = 0; i < T; ++i) {
    const double beta = 1e-4 + (0.02 - 1e-4) * i / (T - 1);
    p *= 1.0 - beta;
    ab[i] = p;
  }
  for (int t : {1, 2, 10, 500, 999}) {
    const double abt = ab[t], abp = ab[t - 1];
    const double alpha = abt / abp, beta = 1 - alpha;
    const StepCoeffs c = ddpm_step_coeffs(static_cast<float>(abt), static_cast<float>(abp), kFixedSmall, true);
    const double x = 0.5, eps = -1.5, z = 0.25;
    const double sigma = std::sqrt((1 - abp) / (1 - abt) * beta);
    // Algorithm 2 of Ho et al.: 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z.
    const double alg2 = 1 / std::sqrt(alpha) * (x - beta / std::sqrt(1 - abt) * eps) + sigma * z;
    const float x0 = ddpm_pred_x0(x, eps, c, kEpsilon, 0.0f);
    const float got = ddpm_prev_sample(x, x0, ddpm_sigma(c, kFixedSmall, 0.0f), z, c);
    // fp32 coefficients from fp32-rounded abar: error well under 1e-5 of the value.
    EXPECT(rel(got, alg2) < 2e-5, "t=%d: fused %g vs algorithm 2 %g", t, got, alg2);
    const StepCoeffs cl = ddpm_step_coeffs(static_cast<float>(abt), static_cast<float>(abp), kFixedLarge, true);
    EXPECT(rel(cl.std, std::sqrt(beta)) < 1e-4, "t=%d: fixed_large sigma %g vs %g", t, cl.std, std::sqrt(beta));
  }
  // t = 0 adds no noise and returns the clipped x0.
  const StepCoeffs c0 = ddpm_step_coeffs(static_cast<float>(ab[0]), 1.0f, kFixedSmall, false);
  const float x0 = ddpm_pred_x0(0.3f, 0.1f, c0, kEpsilon, 1.0f);
  EXPECT(rel(ddpm_prev_sample(0.3f, x0, 1.0f, 100.0f, c0), x0) < 1e-6, "t=0 returns x0");
}

int main() {
  test_philox_kat();
  test_philox_normal_moments();
  test_q_sample();
  test_ddpm_step_forms();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all elementwise tests passed\n");
  return 0;
}
