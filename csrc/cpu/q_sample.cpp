// q_sample on the CPU: one pass, vectorised with at::vec, parallel over the
// flattened batch. The per-element math is
// elementwise.h's q_sample_xt / q_sample_v on vectors, the functions the CUDA kernel runs.
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
  for_each_sample_block(B, M, kGrain, [&](int64_t b, int64_t i, int64_t n) {
    alignas(64) float bx[kBlock], be[kBlock], bo[kBlock], bv[kBlock];
    const Vec va(sab[b]), vs(s1mab[b]);
    const float* px = Block::load(x0 + i, bx, n);
    const float* pe = Block::load(eps + i, be, n);
    float* po = Block::out(xt + i, bo);
    at::vec::map2([=](Vec x, Vec e) { return q_sample_xt(x, e, va, vs); }, po, px, pe, n);
    Block::store(xt + i, po, n);
    if (v != nullptr) {
      float* pv = Block::out(v + i, bv);
      at::vec::map2([=](Vec x, Vec e) { return q_sample_v(x, e, va, vs); }, pv, px, pe, n);
      Block::store(v + i, pv, n);
    }
  });
}

// The arguments are checked by q_sample_op (checks.h).
TensorPair q_sample_cpu(QSampleArgs a) {
  const auto& [x0, noise, t, sqrt_ab, sqrt_1mab, with_v] = a;

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

  const StepLayout io({x0, noise});
  const at::Tensor ein = io.in(noise);
  auto [xt, v] = io.outputs(with_v);
  if (io.has_elements()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
      q_sample_loop<scalar_t>(io.first().data_ptr<scalar_t>(), ein.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                              with_v ? v.data_ptr<scalar_t>() : nullptr, sab, s1mab, B, io.per_sample());
    });
  }
  return io.finish(xt, v, with_v);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) { m.impl("q_sample", &q_sample_op<q_sample_cpu>); }

}  // namespace fastddpm
