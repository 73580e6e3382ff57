// Unit tests of the shared per-element math (csrc/include/fastddpm/elementwise.h),
// of the CUDA GroupNorm slicing (group_norm_split.h) and of the CPU Philox normals (philox_cpu.h) against independent values:
// Random123's known-answer vectors for Philox4x32-10 and float64 evaluations of the
// paper's formulas and of Box-Muller. CMakeLists.txt builds this file once per
// instruction set (native, AVX2, scalar), so every implementation in philox_cpu.h is
// tested on an AVX-512 machine.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "fastddpm/dpmpp_step.h"
#include "fastddpm/elementwise.h"
#include "fastddpm/group_norm_split.h"
#include "fastddpm/philox_cpu.h"

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

// Box-Muller in float64 of Triton's fp32 uniforms (elementwise.h's uint_to_uniform, the
// clamp at 1e-7): what the CPU normals approximate.
static double box_muller64(uint32_t w0, uint32_t w1) {
  float u1 = uint_to_uniform(w0);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const double u2 = uint_to_uniform(w1);
  return std::sqrt(-2.0 * std::log(static_cast<double>(u1))) * std::cos(6.283185307179586 * u2);
}

static void philox_words(uint64_t seed, uint64_t ctr, uint32_t& w0, uint32_t& w1) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  w0 = c0;
  w1 = c1;
}

// Error bound of the CPU normals against box_muller64, as a multiple of max(|z|, 1):
// r = sqrt(-2 log u1) carries half the log's ~1 ulp plus sqrt's 0.5, the cosine
// polynomial < 2 ulp, the product 0.5: 3.5 ulp of 2^-23 relative.
constexpr double kNormalBound = 3.5 * 0x1p-23;

static void test_philox_cpu_blocks() {
  // Every length (tails of the 16/8-wide paths and of the 256-counter chunks), offsets
  // whose counters cross the 32-bit word: bit for bit the scalar transform of the
  // known-answer-tested philox4x32_10 words, and nothing written past n.
  const uint64_t seeds[] = {0, 42, 0xDEADBEEFCAFEF00Dull};
  const uint64_t offsets[] = {0, (1ull << 32) - 5, (1ull << 40) + 3};
  const int64_t lengths[] = {1, 7, 8, 9, 15, 16, 17, 31, 255, 256, 257, 1000, 4099};
  for (uint64_t seed : seeds) {
    for (uint64_t off : offsets) {
      for (int64_t n : lengths) {
        std::vector<float> out(n + 40, std::numeric_limits<float>::quiet_NaN());
        philox_normal_block(seed, off, n, out.data());
        int bad = 0;
        for (int64_t j = 0; j < n; ++j) {
          uint32_t w0, w1;
          philox_words(seed, off + j, w0, w1);
          const float want = philox_cpu::normal_from_words(w0, w1);
          if (std::memcmp(&want, &out[j], 4) != 0 && bad++ == 0) {
            EXPECT(false, "%s: seed %llu offset %llu n %lld: element %lld is %.9g, scalar %.9g", philox_cpu::kIsa,
                   (unsigned long long)seed, (unsigned long long)off, (long long)n, (long long)j, out[j], want);
          }
        }
        for (int64_t j = n; j < n + 40; ++j) {
          EXPECT(std::isnan(out[j]), "%s: n %lld: element %lld written past the end", philox_cpu::kIsa,
                 (long long)n, (long long)j);
        }
      }
    }
  }
}

static void test_philox_cpu_transform_edges() {
  // Crafted words through the vector transform: both ends of the uniforms (u = 0, the
  // 1e-7 clamp, u = 1 from 2^31 - 1 rounding up), the quadrant edges of cos (q = 4 u2 at
  // 1/2, 1, 2, 3, 4 and next to them), and a sweep of all words in steps of a prime.
  std::vector<uint32_t> w0, w1;
  const uint32_t edges[] = {0u, 1u, 2u, 100u, 214u, 215u, 1u << 20, (1u << 27) - 1, 1u << 27, (1u << 28) - 1,
                            1u << 28, (1u << 28) + 1, (1u << 29) - 1, 1u << 29, (1u << 29) + 1,
                            3u << 28, (1u << 30) - 1, 1u << 30, (1u << 30) + 1, (3u << 29) - 1, 3u << 29,
                            (3u << 29) + 1, 0x7FFFFF80u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu, 0xC0000000u};
  for (uint32_t a : edges) {
    for (uint32_t b : edges) {
      w0.push_back(a);
      w1.push_back(b);
      w0.push_back(~a);  // the folded negative twin: the same uniform
      w1.push_back(~b);
    }
  }
  for (uint64_t k = 0; k < (1ull << 32); k += 65521) {
    w0.push_back(static_cast<uint32_t>(k));
    w1.push_back(static_cast<uint32_t>(k * 2654435761u));
    w0.push_back(static_cast<uint32_t>(k * 40503u));
    w1.push_back(static_cast<uint32_t>(k));
  }
  const int64_t n = static_cast<int64_t>(w0.size());
  w0.resize(n + 16);
  w1.resize(n + 16);
  std::vector<float> out(n);
  philox_cpu::normals_from_words(w0.data(), w1.data(), n, out.data());
  double worst = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float scalar = philox_cpu::normal_from_words(w0[j], w1[j]);
    EXPECT(std::memcmp(&scalar, &out[j], 4) == 0, "%s: words %08x %08x: %.9g, scalar %.9g", philox_cpu::kIsa,
           w0[j], w1[j], out[j], scalar);
    const double ref = box_muller64(w0[j], w1[j]);
    worst = std::fmax(worst, std::fabs(out[j] - ref) / std::fmax(std::fabs(ref), 1.0));
  }
  EXPECT(worst <= kNormalBound, "%s: crafted words: error %.3g > %.3g", philox_cpu::kIsa, worst, kNormalBound);
}

static void test_philox_cpu_accuracy() {
  // 3 x 2^20 normals of real streams against float64 Box-Muller of the same uniforms.
  // philox_normal() (libm logf/cosf of the fp32 angle 6.2831855f * u2, what the CUDA
  // kernels and Triton's tl.randn compute) is measured alongside: its angle is rounded
  // by up to half an ulp of 2^2, 2.4e-7, which r <= sqrt(-2 log 1e-7) = 5.7 turns into
  // up to 1.4e-6, plus logf/cosf's own rounding: bound 2e-6.
  const int64_t n = 1 << 20;
  std::vector<float> out(n);
  double worst = 0, worst_libm = 0;
  for (uint64_t seed : {1ull, 7ull, 0x0123456789ABCDEFull}) {
    const uint64_t off = seed * 1000003u;
    philox_normal_block(seed, off, n, out.data());
    for (int64_t j = 0; j < n; ++j) {
      uint32_t w0, w1;
      philox_words(seed, off + j, w0, w1);
      const double ref = box_muller64(w0, w1), scale = std::fmax(std::fabs(ref), 1.0);
      worst = std::fmax(worst, std::fabs(out[j] - ref) / scale);
      worst_libm = std::fmax(worst_libm, std::fabs(philox_normal(seed, off + j) - ref) / scale);
    }
  }
  std::printf("%s Philox normals: max error %.3g x max(|z|, 1) (bound %.3g); philox_normal (libm): %.3g\n",
              philox_cpu::kIsa, worst, kNormalBound, worst_libm);
  EXPECT(worst <= kNormalBound, "%s: error %.3g > %.3g", philox_cpu::kIsa, worst, kNormalBound);
  EXPECT(worst_libm <= 2e-6, "philox_normal: error %.3g > 2e-6", worst_libm);
}

static double rel(double a, double b) { return std::fabs(a - b) / std::fmax(std::fabs(b), 1.0); }

// abar_t of the paper's linear schedule (beta from 1e-4 to 0.02 over 1000 steps), in float64.
static const double* linear_abar() {
  static double ab[1000];
  static bool done = false;
  if (!done) {
    double p = 1.0;
    for (int i = 0; i < 1000; ++i) {
      p *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999.0);
      ab[i] = p;
    }
    done = true;
  }
  return ab;
}

// |got - want| within tol of scale, the sum of the magnitudes of the terms (so cancellation is not an error).
#define EXPECT_NEAR(got, want, scale, tol, ...)                                                         \
  do {                                                                                                   \
    const double g_ = (got), w_ = (want), s_ = (scale);                                                  \
    if (!(std::fabs(g_ - w_) <= (tol) * s_)) {                                                           \
      EXPECT(false, __VA_ARGS__);                                                                        \
      std::printf("  got %.9g, float64 %.9g, scale %.3g\n", g_, w_, s_);                                \
    }                                                                                                    \
  } while (0)

// Every branch of elementwise.h's formulas, in the float instantiation the CUDA kernels run, against float64
// evaluations of the papers' equations written here from the same fp32 abar values the kernels read. The CPU
// kernels instantiate the same templates on vectors (cpu_vec.h), so a mutation of any branch (a flipped sign,
// swapped coefficients, a skipped clip) fails here without a GPU, and in tests/test_*.py, which compare the CPU
// kernels with float64 for every prediction type, variance type and clip setting. Measured errors are a few fp32
// ulp; the tolerance of 4e-6 of the terms' magnitudes is ~30 ulp, a mutation moves the result by O(1).
constexpr double kTol = 4e-6;
constexpr int64_t kPredictionTypes[] = {kEpsilon, kSample, kVPrediction};
static const char* const kPredictionNames[] = {"epsilon", "sample", "v_prediction"};
// (x_t, model output) pairs of both sign patterns, small and large.
constexpr double kPairs[][2] = {{0.5, -1.5}, {-1.25, 0.75}, {2.0, 1.5}, {-0.3, -2.5}, {0.05, 0.02}};
constexpr int kTimesteps[] = {1, 2, 10, 500, 999};

static void test_q_sample() {
  const double* ab = linear_abar();
  for (int t : kTimesteps) {
    const float abt = static_cast<float>(ab[t]);
    const float sa = std::sqrt(abt), s1 = std::sqrt(1.0f - abt);
    for (const auto& xe : kPairs) {
      const float x0 = static_cast<float>(xe[0]), eps = static_cast<float>(xe[1]);
      const double sa64 = std::sqrt(static_cast<double>(abt)), s164 = std::sqrt(1.0 - abt);
      const double scale = sa64 * std::fabs(x0) + s164 * std::fabs(eps);
      EXPECT_NEAR(q_sample_xt(x0, eps, sa, s1), sa64 * x0 + s164 * eps, scale, kTol, "q_sample x_t, t=%d", t);
      EXPECT_NEAR(q_sample_v(x0, eps, sa, s1), sa64 * eps - s164 * x0, scale, kTol, "q_sample v, t=%d", t);
    }
  }
}

// x0 from the model output (Ho et al. eq. 15; Salimans & Ho's v), clipped: float64.
static double x0_ref(double x, double m, double abt, int64_t pt, double clip, double* scale) {
  const double sa = std::sqrt(abt), s1 = std::sqrt(1.0 - abt);
  double x0;
  if (pt == kEpsilon) {
    x0 = (x - s1 * m) / sa;
    *scale = (std::fabs(x) + s1 * std::fabs(m)) / sa;
  } else if (pt == kSample) {
    x0 = m;
    *scale = std::fabs(m);
  } else {
    x0 = sa * x - s1 * m;
    *scale = sa * std::fabs(x) + s1 * std::fabs(m);
  }
  return clip > 0.0 ? std::fmin(std::fmax(x0, -clip), clip) : x0;
}

static void test_pred_x0_branches() {
  // The x0 of ddpm_step, ddim_step and dpmpp_step (one function, pred_x0, through each op's coefficients):
  // every prediction type, without and with a clip that both binds and does not.
  const double* ab = linear_abar();
  int clipped = 0, inside = 0;
  for (int t : kTimesteps) {
    const float abt = static_cast<float>(ab[t]), abp = static_cast<float>(ab[t - 1]);
    const StepCoeffs c = ddpm_step_coeffs(abt, abp, kFixedSmall, true);
    const DdimCoeffs d = ddim_step_coeffs(abt, abp, 0.0f);
    const DpmppCoeffs e = dpmpp_step_coeffs(abt, abp, abt, false, false);
    for (int k = 0; k < 3; ++k) {
      const int64_t pt = kPredictionTypes[k];
      for (const auto& xm : kPairs) {
        const float x = static_cast<float>(xm[0]), m = static_cast<float>(xm[1]);
        for (float clip : {0.0f, 1.0f}) {
          double scale;
          const double want = x0_ref(x, m, abt, pt, clip, &scale);
          if (clip > 0.0f) (std::fabs(want) == 1.0 ? clipped : inside)++;
          float ddim_x0;
          ddim_mean(x, m, d, pt, clip, false, &ddim_x0);
          EXPECT_NEAR(ddpm_pred_x0(x, m, c, pt, clip), want, scale, kTol, "ddpm x0 %s t=%d clip=%g",
                      kPredictionNames[k], t, clip);
          EXPECT_NEAR(ddim_x0, want, scale, kTol, "ddim x0 %s t=%d clip=%g", kPredictionNames[k], t, clip);
          EXPECT_NEAR(dpmpp_x0(x, m, e, pt, clip), want, scale, kTol, "dpmpp x0 %s t=%d clip=%g",
                      kPredictionNames[k], t, clip);
        }
      }
    }
  }
  EXPECT(clipped > 10 && inside > 10, "the clip bound %d cases and left %d: both branches must run", clipped, inside);
}

static void test_ddpm_variance_branches() {
  // sigma_t of every variance type and the whole update x_{t-1} = c_x0 x0 + c_xt x_t + sigma_t z (Ho et al.
  // eqs. 6-7; learned_range: Nichol & Dhariwal eq. 15), with and without noise, against float64.
  const double* ab = linear_abar();
  for (int t : kTimesteps) {
    const float abt = static_cast<float>(ab[t]), abp = static_cast<float>(ab[t - 1]);
    const double at = abt, ap = abp, beta = (ap - at) / ap;
    const double var = (1.0 - ap) / (1.0 - at) * beta;
    const double c_x0 = std::sqrt(ap) * beta / (1.0 - at), c_xt = std::sqrt(at / ap) * (1.0 - ap) / (1.0 - at);
    struct Case { int64_t type; double pv, sigma; const char* name; };
    const double frac = 0.5 * (0.3 + 1.0);
    const Case cases[] = {
        {kFixedSmall, 0.0, std::sqrt(var), "fixed_small"},
        {kFixedSmallLog, 0.0, std::sqrt(var), "fixed_small_log"},
        {kFixedLarge, 0.0, std::sqrt(beta), "fixed_large"},
        {kLearned, 0.37 * var, std::sqrt(0.37 * var), "learned"},
        {kLearnedRange, 0.3, std::exp(0.5 * (frac * std::log(beta) + (1.0 - frac) * std::log(var))), "learned_range"},
    };
    for (const Case& k : cases) {
      const float pv = static_cast<float>(k.pv);
      for (bool noise : {true, false}) {
        const StepCoeffs c = ddpm_step_coeffs(abt, abp, k.type, noise);
        const float sigma = ddpm_sigma(c, k.type, pv);
        EXPECT_NEAR(sigma, k.sigma, k.sigma, kTol, "%s sigma, t=%d", k.name, t);
        for (const auto& xm : kPairs) {
          const float x = static_cast<float>(xm[0]), x0 = static_cast<float>(xm[1]), z = 0.875f;
          const double want = c_x0 * x0 + c_xt * x + (noise ? k.sigma * z : 0.0);
          const double scale = std::fabs(c_x0 * x0) + std::fabs(c_xt * x) + (noise ? k.sigma * z : 0.0);
          EXPECT_NEAR(ddpm_prev_sample(x, x0, sigma, z, c), want, scale, kTol, "%s x_{t-1}, t=%d noise=%d",
                      k.name, t, noise);
        }
      }
    }
  }
}

static void test_ddim_branches() {
  // ddim_mean (Song et al. eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps, eps
  // predicted from the model output or, with use_clipped_model_output, from the clipped x0; every prediction
  // type, clip and eta 0 and 0.7, against float64.
  const double* ab = linear_abar();
  for (int t : kTimesteps) {
    const int tp = t >= 20 ? t - 20 : t - 1;
    const float abt = static_cast<float>(ab[t]), abp = static_cast<float>(ab[tp]);
    const double at = abt, ap = abp, sa = std::sqrt(at), s1 = std::sqrt(1.0 - at);
    for (float eta : {0.0f, 0.7f}) {
      const DdimCoeffs d = ddim_step_coeffs(abt, abp, eta);
      const double sigma2 = eta * eta * (1.0 - ap) / (1.0 - at) * ((ap - at) / ap);
      const double c_eps = std::sqrt(1.0 - ap - sigma2);
      EXPECT_NEAR(d.std, std::sqrt(sigma2), std::sqrt(sigma2) + 1e-30, kTol, "ddim sigma, t=%d eta=%g", t, eta);
      for (int k = 0; k < 3; ++k) {
        const int64_t pt = kPredictionTypes[k];
        for (const auto& xm : kPairs) {
          const float x = static_cast<float>(xm[0]), m = static_cast<float>(xm[1]);
          for (float clip : {0.0f, 1.0f}) {
            for (bool use_clipped : {false, true}) {
              double x0_scale;
              const double x0 = x0_ref(x, m, at, pt, clip, &x0_scale);
              double eps, eps_scale;
              if (use_clipped) {
                eps = (x - sa * x0) / s1;
                eps_scale = (std::fabs(x) + sa * x0_scale) / s1;
              } else if (pt == kEpsilon) {
                eps = m;
                eps_scale = std::fabs(m);
              } else if (pt == kSample) {
                eps = (x - sa * m) / s1;
                eps_scale = (std::fabs(x) + sa * std::fabs(m)) / s1;
              } else {
                eps = sa * m + s1 * x;
                eps_scale = sa * std::fabs(m) + s1 * std::fabs(x);
              }
              float got_x0;
              const float got = ddim_mean(x, m, d, pt, clip, use_clipped, &got_x0);
              EXPECT_NEAR(got, std::sqrt(ap) * x0 + c_eps * eps, std::sqrt(ap) * x0_scale + c_eps * eps_scale, kTol,
                          "ddim %s t=%d eta=%g clip=%g use_clipped=%d", kPredictionNames[k], t, eta, clip,
                          use_clipped);
            }
          }
        }
      }
    }
  }
}

static void test_dpmpp_update() {
  // The DPM-Solver++(2M) update from its coefficients (checked against float64 in test_dpmpp_coeffs).
  const double* ab = linear_abar();
  const float a0 = static_cast<float>(ab[500]), at = static_cast<float>(ab[450]), a1 = static_cast<float>(ab[550]);
  const DpmppCoeffs c = dpmpp_step_coeffs(a0, at, a1, false, true);
  for (const auto& xm : kPairs) {
    const float x = static_cast<float>(xm[0]), x0 = static_cast<float>(xm[1]), p = 0.625f;
    const double want = static_cast<double>(c.c_x) * x + static_cast<double>(c.c_x0) * x0 +
                        static_cast<double>(c.c_prev) * p;
    const double scale = std::fabs(c.c_x * x) + std::fabs(c.c_x0 * x0) + std::fabs(c.c_prev * p);
    EXPECT_NEAR(dpmpp_update(x, x0, p, c), want, scale, kTol, "dpmpp update");
  }
}

static void test_ddpm_step_forms() {
  const double* ab = linear_abar();
  for (int t : {1, 2, 10, 500, 999}) {
    const double abt = ab[t], abp = ab[t - 1];
    const double alpha = abt / abp, beta = 1 - alpha;
    const StepCoeffs c = ddpm_step_coeffs(static_cast<float>(abt), static_cast<float>(abp), kFixedSmall, true);
    const float x = 0.5f, eps = -1.5f, z = 0.25f;
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

static void test_step_beta() {
  // beta_t = 1 - alpha_t from fp32 abar values: the exact form (abar_prev - abar_t) / abar_prev is within an ulp
  // or two of its float64 value; diffusers' 1 - abar_t / abar_prev (diffusers_beta, for the drop-in's numbers)
  // is that expression to the bit and, where beta_t ~ 1e-4, off by far more (its subtraction cancels).
  const double* ab = linear_abar();
  double worst_diffusers_t1 = 0.0, worst_exact_t1 = 0.0;
  for (int t : {1, 2, 10, 500, 999}) {
    const float abt = static_cast<float>(ab[t]), abp = static_cast<float>(ab[t - 1]);
    const double want = (static_cast<double>(abp) - abt) / abp;  // of the fp32 values the kernels read
    const float exact = step_beta(abt, abp, false), diff = step_beta(abt, abp, true);
    EXPECT(std::fabs(exact - want) / want < 2.5e-7, "t=%d: exact beta %.9g vs float64 %.9g", t, exact, want);
    EXPECT(diff == 1.0f - abt / abp, "t=%d: diffusers' form is not 1 - abar_t / abar_prev in fp32", t);
    if (t == 1) {
      worst_exact_t1 = std::fabs(exact - want) / want;
      worst_diffusers_t1 = std::fabs(diff - want) / want;
    }
    const StepCoeffs c = ddpm_step_coeffs(abt, abp, kFixedLarge, true, true);
    EXPECT(c.std == std::sqrt(diff), "t=%d: diffusers_beta does not reach the coefficients", t);
    const DdimCoeffs d = ddim_step_coeffs(abt, abp, 1.0f, true), e = ddim_step_coeffs(abt, abp, 1.0f, false);
    EXPECT(d.sqrt_ab_prev == e.sqrt_ab_prev && (t != 1 || d.std != e.std), "t=%d: ddim diffusers_beta", t);
  }
  EXPECT(worst_diffusers_t1 > 1e-5 && worst_diffusers_t1 > 20 * worst_exact_t1,
         "t=1: diffusers' beta off by %g, the exact form by %g", worst_diffusers_t1, worst_exact_t1);
}

static void test_silu() {
  // silu and its derivative (group_norm_silu's CUDA kernels) against float64: the function itself, and
  // the derivative against a central difference of it (independent of the closed form).
  auto silu64 = [](double z) { return z / (1.0 + std::exp(-z)); };
  for (double z = -30.0; z <= 30.0; z += 0.0625) {
    const float zf = static_cast<float>(z);
    const double ref = silu64(zf);
    EXPECT(std::fabs(silu(zf) - ref) <= 2e-7 * std::fmax(std::fabs(ref), 1.0), "silu(%g) = %.9g vs %.9g", z,
           silu(zf), ref);
    const double h = 1e-5, dref = (silu64(zf + h) - silu64(zf - h)) / (2 * h);
    const float dy = 0.75f;
    EXPECT(std::fabs(silu_backward(zf, dy) - dy * dref) <= 1e-6 * std::fmax(std::fabs(dy * dref), 1.0),
           "silu'(%g) = %.9g vs %.9g", z, silu_backward(zf, dy) / dy, dref);
  }
}

static void test_group_norm_split() {
  // The U-Net's GroupNorm shapes at batch 1 and 16 (forward rows (n, g) of D channels; backward
  // rows (n, c) of one), on a 132-SM GPU (min_blocks = 4 per SM), plus awkward sizes.
  struct Case { int64_t N, C, G, HW; };
  const Case cases[] = {{1, 128, 32, 1024}, {1, 256, 32, 256}, {1, 256, 32, 64}, {1, 256, 32, 16},
                        {16, 128, 32, 1024}, {16, 256, 32, 16}, {1, 32, 32, 1},  {2, 6, 3, 13},
                        {1, 64, 2, 9216},   {3, 12, 1, 21},    {1, 8, 2, 0}};
  const int64_t min_blocks = 4 * 132;
  for (const Case& k : cases) {
    for (int bwd = 0; bwd < 2; ++bwd) {
      const int64_t per_row = bwd ? 1 : k.C / k.G, rows = bwd ? k.N * k.C : k.N * k.G;
      int64_t split = 0, s_per = 0;
      group_norm_split(k.HW, per_row, rows, min_blocks, &split, &s_per);
      const int64_t HW = k.HW > 0 ? k.HW : 1;
      EXPECT(split >= 1 && s_per >= 1, "HW=%lld: split %lld, s_per %lld", (long long)k.HW, (long long)split,
             (long long)s_per);
      // The slices cover the row exactly: none empty, none past the end.
      EXPECT((split - 1) * s_per < HW && HW <= split * s_per, "HW=%lld: %lld slices of %lld", (long long)k.HW,
             (long long)split, (long long)s_per);
      const int64_t elems = k.HW * per_row, blocks = rows * split;
      // Enough blocks to fill the GPU wherever slices of >= 256 elements allow it ...
      const int64_t possible = rows * (elems / 256 > 1 ? elems / 256 : 1);
      const int64_t want = possible < min_blocks ? possible : min_blocks;
      EXPECT(blocks >= want || split == k.HW, "N=%lld C=%lld HW=%lld %s: %lld blocks, want >= %lld", (long long)k.N,
             (long long)k.C, (long long)k.HW, bwd ? "bwd" : "fwd", (long long)blocks, (long long)want);
      // ... and never slices under 256 elements, nor over ~4096 when the grid is already full.
      if (split > 1) {
        EXPECT(s_per * per_row >= 256, "HW=%lld: slices of %lld elements (< 256)", (long long)k.HW,
               (long long)(s_per * per_row));
      }
      if (rows >= min_blocks) {
        EXPECT(s_per * per_row <= 2 * 4096 || split == 1, "HW=%lld: slices of %lld elements with a full grid",
               (long long)k.HW, (long long)(s_per * per_row));
      }
    }
  }
  // Batch 1, 1x128x32x32 (32 groups of 4096): one block per group would leave 100 of 132 SMs idle.
  int64_t split = 0, s_per = 0;
  group_norm_split(1024, 4, 32, min_blocks, &split, &s_per);
  EXPECT(32 * split >= 512, "1x128x32x32 forward: %lld blocks", (long long)(32 * split));
}

static void test_dpmpp_coeffs() {
  // dpmpp_step_coeffs against float64 evaluations of DPM-Solver++(2M)'s coefficients (Lu et al. 2022, the paper's
  // lambda = log(alpha / sigma) differences) from the same fp32 abar values; adjacent timesteps included, where
  // the difference of two fp32 lambdas (diffusers' form) is off by ~5e-6: asserted, so the check can fail.
  const double* ab = linear_abar();
  auto lam = [](double a) { return 0.5 * std::log(a / (1.0 - a)); };
  struct Case { int s0, t, s1; };
  double worst = 0.0, naive_adjacent = 0.0;
  for (const Case c : {Case{999, 949, 999}, Case{500, 450, 550}, Case{500, 499, 501}, Case{51, 1, 101},
                       Case{3, 2, 4}, Case{949, 899, 999}}) {
    const float a0 = static_cast<float>(ab[c.s0]), at = static_cast<float>(ab[c.t]), a1 = static_cast<float>(ab[c.s1]);
    const double h = lam(at) - lam(a0), r0 = (lam(a0) - lam(a1)) / h;
    const double k = std::sqrt(static_cast<double>(at)) * -std::expm1(-h);
    const double cx = std::sqrt((1.0 - at) / (1.0 - static_cast<double>(a0)));
    for (bool second : {false, true}) {
      if (second && c.s1 == c.s0) continue;
      const DpmppCoeffs d = dpmpp_step_coeffs(a0, at, a1, false, second);
      const double want_x0 = second ? k * (1.0 + 0.5 / r0) : k, want_prev = second ? -k * 0.5 / r0 : 0.0;
      const double scale = std::fabs(want_x0) + std::fabs(want_prev);
      const double e = std::fmax(std::fabs(d.c_x - cx) / cx, (std::fabs(d.c_x0 - want_x0) +
                                                              std::fabs(d.c_prev - want_prev)) / scale);
      worst = std::fmax(worst, e);
      EXPECT(e < 1e-6, "dpmpp s0=%d t=%d s1=%d second=%d: relative error %g", c.s0, c.t, c.s1, second, e);
    }
    if (c.t == 499) {
      const float nh = 0.5f * (std::log(at / (1.0f - at)) - std::log(a0 / (1.0f - a0)));
      naive_adjacent = std::fabs(nh - h) / h;
    }
    const DpmppCoeffs f = dpmpp_step_coeffs(a0, at, a1, true, true);  // to sigma = 0: x0 itself
    EXPECT(f.c_x == 0.0f && f.c_x0 == 1.0f && f.c_prev == 0.0f, "dpmpp final step s0=%d", c.s0);
  }
  EXPECT(naive_adjacent > 10 * worst, "the fp32 lambda difference (%g) should be far worse than the kernel's (%g)",
         naive_adjacent, worst);
}

int main() {
  // A build for an instruction set this CPU lacks has nothing to run here.
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("skipped: built for AVX-512F, which this CPU lacks\n");
    return 0;
  }
#elif defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("skipped: built for AVX2 + FMA, which this CPU lacks\n");
    return 0;
  }
#endif
  std::printf("philox_cpu.h implementation: %s\n", philox_cpu::kIsa);
  test_philox_kat();
  test_philox_cpu_blocks();
  test_philox_cpu_transform_edges();
  test_philox_cpu_accuracy();
  test_philox_normal_moments();
  test_q_sample();
  test_pred_x0_branches();
  test_ddpm_variance_branches();
  test_ddim_branches();
  test_dpmpp_update();
  test_ddpm_step_forms();
  test_dpmpp_coeffs();
  test_step_beta();
  test_silu();
  test_group_norm_split();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all elementwise tests passed\n");
  return 0;
}
