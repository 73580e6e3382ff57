// q_sample on the CPU: one pass, vectorised with at::vec, parallel over the
// flattened batch so a batch of one still uses every core.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace {

constexpr int64_t kGrain = 16384;

template <typename scalar_t>
void q_sample_loop(const scalar_t* x0, const scalar_t* eps, scalar_t* xt, scalar_t* v,
                   const std::vector<float>& sab, const std::vector<float>& s1mab, int64_t B,
                   int64_t M) {
  using Block = FloatBlock<scalar_t>;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float bx[kBlock], be[kBlock], bo[kBlock], bv[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / M;
      const int64_t seg_end = std::min(end, (b + 1) * M);
      const Vec va(sab[b]), vs(s1mab[b]);
      while (i < seg_end) {
        const int64_t n = std::min(kBlock, seg_end - i);
        const float* px = Block::load(x0 + i, bx, n);
        const float* pe = Block::load(eps + i, be, n);
        float* po = Block::out(xt + i, bo);
        at::vec::map2([=](Vec x, Vec e) { return va * x + vs * e; }, po, px, pe, n);
        Block::store(xt + i, po, n);
        if (v != nullptr) {
          float* pv = Block::out(v + i, bv);
          at::vec::map2([=](Vec x, Vec e) { return va * e - vs * x; }, pv, px, pe, n);
          Block::store(v + i, pv, n);
        }
        i += n;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& noise,
                                                const at::Tensor& t, const at::Tensor& sqrt_ab,
                                                const at::Tensor& sqrt_1mab, bool with_v) {
  check_float_tensor(x0, "x0");
  TORCH_CHECK(x0.dim() >= 1, "x0: expected a batch dimension, got a 0-d tensor");
  check_like(noise, x0, "noise", "x0");
  check_timesteps(t, x0, "t");
  check_table(sqrt_ab, x0, "sqrt_alphas_cumprod");
  check_table(sqrt_1mab, x0, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_ab.size(0) == sqrt_1mab.size(0),
              "sqrt_one_minus_alphas_cumprod: expected the length of sqrt_alphas_cumprod (",
              sqrt_ab.size(0), "), got ", sqrt_1mab.size(0));

  const int64_t B = x0.size(0);
  const int64_t T = sqrt_ab.size(0);
  const auto tc = t.contiguous();
  const auto ta = sqrt_ab.contiguous();
  const auto tb = sqrt_1mab.contiguous();
  std::vector<float> sab(B), s1mab(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tb_ = tc.data_ptr<int64_t>()[b];
    TORCH_CHECK(tb_ >= 0 && tb_ < T, "t: expected timesteps in [0, ", T, "), got ", tb_,
                " at index ", b);
    sab[b] = ta.data_ptr<float>()[tb_];
    s1mab[b] = tb.data_ptr<float>()[tb_];
  }

  // Work in x0's layout when every operand shares it; otherwise in NCHW order.
  const bool direct = batch_major_dense({x0, noise});
  const at::Tensor xin = direct ? x0 : x0.contiguous();
  const at::Tensor ein = direct ? noise : noise.contiguous();
  at::Tensor xt = at::empty_like(xin);
  at::Tensor v = with_v ? at::empty_like(xin) : at::empty({0}, x0.options());
  if (B > 0 && x0.numel() > 0) {
    const int64_t M = x0.numel() / B;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
      q_sample_loop<scalar_t>(xin.data_ptr<scalar_t>(), ein.data_ptr<scalar_t>(),
                              xt.data_ptr<scalar_t>(),
                              with_v ? v.data_ptr<scalar_t>() : nullptr, sab, s1mab, B, M);
    });
  }
  if (!direct) {
    // Give the result the memory format of x0 (channels_last stays channels_last).
    const auto fmt = x0.suggest_memory_format();
    xt = xt.contiguous(fmt);
    if (with_v) v = v.contiguous(fmt);
  }
  return {xt, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace fastddpm
