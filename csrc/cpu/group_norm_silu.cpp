// GroupNorm (+ SiLU) on the CPU, forward and backward, vectorised with at::vec.
//
// Forward: pass 1 reads x once for per-(n, group) statistics, split into chunks
// (NCHW: pieces of each group's contiguous run; channels_last: runs of spatial
// positions with per-channel accumulators) so a batch of one keeps every core
// busy; each chunk sums x - K and (x - K)^2 with K the group's first element
// (shifted sums: no cancellation when |mean| >> std), in fp32 vectors within a
// chunk and fp64 across chunks, combined in a fixed order (deterministic for any
// thread count). Pass 2 reads x again and writes silu(a x + b) straight into y,
// with z = (x - mean) rstd w + bias per (n, c). Both layouts are read in place.
//
// Backward: pass 1 reduces A = sum dz and B = sum dz xhat per (n, c), recomputing
// z and xhat from x and the saved mean/rstd; pass 2 writes
// dx = rstd (w dz - c1 - c2 (x - mean)) per element (see fastddpm/ops/group_norm_silu.py).
//
// float64 inputs are accepted and computed in double (used by gradcheck); the
// public function routes float64 to the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "fastddpm/cpu_vec.h"

namespace fastddpm {
namespace {

// Elements per statistics task: U-Net shapes at batch 1 give dozens of tasks.
constexpr int64_t kChunk = 4096;
// Elements per task of the elementwise passes; also the least work worth a second thread
// (below it at::parallel_for runs inline, sparing the thread wake-up at small shapes).
constexpr int64_t kGrain = 16384;

// parallel_for grain, in tasks of `per_task` elements, that keeps small inputs on one thread.
inline int64_t task_grain(int64_t per_task) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_task, 1)); }

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Converts up to kBlock elements to the compute type (in place when it already is).
template <typename T, typename A>
struct Blk {
  static const A* load(const T* src, A* buf, int64_t n) {
    if constexpr (std::is_same_v<T, A>) {
      return src;
    } else {
      at::vec::convert(src, buf, n);
      return buf;
    }
  }
  static A* out(T* dst, A* buf) {
    if constexpr (std::is_same_v<T, A>) {
      return dst;
    } else {
      return buf;
    }
  }
  static void store(T* dst, const A* buf, int64_t n) {
    if constexpr (!std::is_same_v<T, A>) at::vec::convert(buf, dst, n);
  }
};

template <typename A>
inline at::vec::Vectorized<A> sigmoid(const at::vec::Vectorized<A>& z) {
  using V = at::vec::Vectorized<A>;
  if constexpr (std::is_same_v<A, float>) {
    // exp_u20: a few ulp, about twice as fast as the Sleef exp; |z| large gives 0 or 1.
    return V(1.f) / (V(1.f) + z.neg().exp_u20());
  } else {
    return V(1.0) / (V(1.0) + z.neg().exp());
  }
}

template <typename A>
inline A sigmoid_scalar(A z) {
  return A(1) / (A(1) + std::exp(-z));
}

// Sum of the lanes, in double.
template <typename A>
inline double hsum(const at::vec::Vectorized<A>& v) {
  alignas(64) A l[at::vec::Vectorized<A>::size()];
  v.store(l);
  double d = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) d += l[i];
  return d;
}

// fp32 partial sums run over at most kFlush spatial positions (channels_last) or
// one kBlock (NCHW) before they are added into double accumulators.
constexpr int64_t kFlush = 16;

struct Geometry {
  int64_t N, C, G, D, HW;  // D = C / G channels per group, HW = spatial size
  bool cl;                 // channels_last: x viewed as (N, HW, C); else (N, C, HW)
};

// Whether x is laid out (N, *spatial, C) densely: channels_last for any spatial rank.
bool is_channels_last(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) return false;
  return x.movedim(1, -1).is_contiguous();
}

// ---------------------------------------------------------------------------
// Pass 1 of the forward: mean and rstd per (n, g), into double arrays (N * G).
// ---------------------------------------------------------------------------
template <typename T>
void group_stats(const T* x, const Geometry& g, double eps, std::vector<double>& mean,
                 std::vector<double>& rstd) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  const int64_t M = g.D * g.HW;  // elements per group
  const int64_t NG = g.N * g.G;
  if (M == 0) {  // empty groups (a zero-size spatial dim): no element to read
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(rstd.begin(), rstd.end(), 1.0 / std::sqrt(eps));
    return;
  }
  // Shift per group: its first element.
  std::vector<A> shift(NG);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t k = 0; k < g.G; ++k)
      shift[n * g.G + k] = static_cast<A>(g.cl ? x[n * g.HW * g.C + k * g.D] : x[(n * g.G + k) * M]);

  std::vector<double> s1(NG, 0.0), s2(NG, 0.0);
  if (!g.cl) {
    // Group (n, k) is the contiguous run [(n G + k) M, +M); split it in chunks.
    const int64_t per = (M + kChunk - 1) / kChunk;
    const int64_t tasks = NG * per;
    std::vector<double> p1(tasks), p2(tasks);
    at::parallel_for(0, tasks, task_grain(std::min(M, kChunk)), [&](int64_t begin, int64_t end) {
      alignas(64) A buf[kBlock];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t grp = t / per, c = t % per;
        const int64_t lo = c * kChunk, hi = std::min(M, lo + kChunk);
        const T* base = x + grp * M;
        const A K = shift[grp];
        const V vK(K);
        double d1 = 0, d2 = 0;
        for (int64_t i = lo; i < hi; i += kBlock) {
          const int64_t n = std::min(kBlock, hi - i);
          const A* p = Blk<T, A>::load(base + i, buf, n);
          V a1(A(0)), a2(A(0)), b1(A(0)), b2(A(0));
          A t1 = 0, t2 = 0;
          int64_t j = 0;
          for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
            const V v = V::loadu(p + j) - vK;
            const V w = V::loadu(p + j + V::size()) - vK;
            a1 = a1 + v;
            a2 = at::vec::fmadd(v, v, a2);
            b1 = b1 + w;
            b2 = at::vec::fmadd(w, w, b2);
          }
          for (; j < n; ++j) {
            const A v = p[j] - K;
            t1 += v;
            t2 += v * v;
          }
          d1 += hsum(a1 + b1) + t1;
          d2 += hsum(a2 + b2) + t2;
        }
        p1[t] = d1;
        p2[t] = d2;
      }
    });
    for (int64_t t = 0; t < tasks; ++t) {
      s1[t / per] += p1[t];
      s2[t / per] += p2[t];
    }
  } else {
    // (N, HW, C): chunks of spatial positions with per-channel accumulators.
    const int64_t C = g.C;
    const int64_t rows = std::max<int64_t>(1, kChunk / C);
    const int64_t per = (g.HW + rows - 1) / rows;
    const int64_t tasks = g.N * per;
    std::vector<double> p1(tasks * g.G), p2(tasks * g.G);
    at::parallel_for(0, tasks, task_grain(rows * C), [&](int64_t begin, int64_t end) {
      std::vector<A> acc1(C), acc2(C), sh(C);
      std::vector<double> dacc1(C), dacc2(C);
      alignas(64) A buf[kBlock];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / per, c = t % per;
        const int64_t lo = c * rows, hi = std::min(g.HW, lo + rows);
        for (int64_t ch = 0; ch < C; ++ch) sh[ch] = shift[n * g.G + ch / g.D];
        std::fill(acc1.begin(), acc1.end(), A(0));
        std::fill(acc2.begin(), acc2.end(), A(0));
        std::fill(dacc1.begin(), dacc1.end(), 0.0);
        std::fill(dacc2.begin(), dacc2.end(), 0.0);
        for (int64_t s = lo; s < hi; ++s) {
          if ((s - lo) % kFlush == 0 && s > lo) {
            for (int64_t ch = 0; ch < C; ++ch) {
              dacc1[ch] += acc1[ch];
              dacc2[ch] += acc2[ch];
              acc1[ch] = acc2[ch] = A(0);
            }
          }
          const T* row = x + (n * g.HW + s) * C;
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
            const int64_t len = std::min(kBlock, C - c0);
            const A* p = Blk<T, A>::load(row + c0, buf, len);
            int64_t j = 0;
            for (; j + V::size() <= len; j += V::size()) {
              const V v = V::loadu(p + j) - V::loadu(sh.data() + c0 + j);
              (V::loadu(acc1.data() + c0 + j) + v).store(acc1.data() + c0 + j);
              at::vec::fmadd(v, v, V::loadu(acc2.data() + c0 + j)).store(acc2.data() + c0 + j);
            }
            for (; j < len; ++j) {
              const A v = p[j] - sh[c0 + j];
              acc1[c0 + j] += v;
              acc2[c0 + j] += v * v;
            }
          }
        }
        for (int64_t k = 0; k < g.G; ++k) {
          double d1 = 0, d2 = 0;
          for (int64_t ch = k * g.D; ch < (k + 1) * g.D; ++ch) {
            d1 += dacc1[ch] + acc1[ch];
            d2 += dacc2[ch] + acc2[ch];
          }
          p1[t * g.G + k] = d1;
          p2[t * g.G + k] = d2;
        }
      }
    });
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / per;
      for (int64_t k = 0; k < g.G; ++k) {
        s1[n * g.G + k] += p1[t * g.G + k];
        s2[n * g.G + k] += p2[t * g.G + k];
      }
    }
  }
  for (int64_t i = 0; i < NG; ++i) {
    const double m1 = s1[i] / M;
    const double var = std::max(s2[i] / M - m1 * m1, 0.0);
    mean[i] = static_cast<double>(shift[i]) + m1;
    rstd[i] = 1.0 / std::sqrt(var + eps);
  }
}

// ---------------------------------------------------------------------------
// Elementwise pass over x (and dy) with NCOEF per-(n, c) coefficient arrays:
// out = f(x, dy, coef...). NCHW tiles are (row n*C + c, spatial range) with the
// coefficients broadcast; channels_last tiles are (position, channel range)
// with the coefficients loaded as vectors.
// ---------------------------------------------------------------------------
template <typename T, int NCOEF, bool DY, typename F>
void apply_pass(const T* x, const T* dy, T* out, const std::array<const opmath_t<T>*, NCOEF>& coef,
                const Geometry& g, const F& f) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  const int64_t total = g.N * g.C * g.HW;
  if (total == 0) return;
  // One tile: len contiguous elements at flat offset off; coefficients at index ci
  // (broadcast when !vary, else ci .. ci + len).
  auto tile = [&](int64_t off, int64_t len, int64_t ci, bool vary, A* bx, A* bd, A* bo) {
    std::array<V, NCOEF> cv;
    if (!vary)
      for (int k = 0; k < NCOEF; ++k) cv[k] = V(coef[k][ci]);
    for (int64_t i = 0; i < len; i += kBlock) {
      const int64_t n = std::min(kBlock, len - i);
      const A* px = Blk<T, A>::load(x + off + i, bx, n);
      const A* pd = DY ? Blk<T, A>::load(dy + off + i, bd, n) : nullptr;
      A* po = Blk<T, A>::out(out + off + i, bo);
      int64_t j = 0;
      for (; j < n; j += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), n - j);
        if (vary)
          for (int k = 0; k < NCOEF; ++k) cv[k] = V::loadu(coef[k] + ci + i + j, cnt);
        const V xv = V::loadu(px + j, cnt);
        const V dv = DY ? V::loadu(pd + j, cnt) : V(A(0));
        const V r = f(xv, dv, cv);
        if (cnt == V::size())
          r.store(po + j);
        else
          r.store(po + j, cnt);
      }
      Blk<T, A>::store(out + off + i, po, n);
    }
  };
  if (!g.cl) {
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      alignas(64) A bx[kBlock], bd[kBlock], bo[kBlock];
      int64_t i = begin;
      while (i < end) {
        const int64_t r = i / g.HW;
        const int64_t seg_end = std::min(end, (r + 1) * g.HW);
        tile(i, seg_end - i, r, false, bx, bd, bo);
        i = seg_end;
      }
    });
  } else {
    const int64_t positions = g.N * g.HW;
    const int64_t grain = std::max<int64_t>(1, kGrain / g.C);
    at::parallel_for(0, positions, grain, [&](int64_t begin, int64_t end) {
      alignas(64) A bx[kBlock], bd[kBlock], bo[kBlock];
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / g.HW;
        tile(p * g.C, g.C, n * g.C, true, bx, bd, bo);
      }
    });
  }
}

Geometry geometry(const at::Tensor& x, int64_t num_groups, bool cl) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.G = num_groups;
  g.D = g.C / num_groups;
  g.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.HW *= x.size(d);
  g.cl = cl;
  return g;
}

void check_input(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got None");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "x: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 2, "x: expected shape (N, C, *spatial), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(num_groups > 0, "num_groups: expected a positive int, got ", num_groups);
  TORCH_CHECK(x.size(1) % num_groups == 0, "num_groups: the number of channels C=", x.size(1),
              " of x must be divisible by num_groups=", num_groups);
  const char* names[2] = {"weight", "bias"};
  const c10::optional<at::Tensor>* ps[2] = {&weight, &bias};
  for (int i = 0; i < 2; ++i) {
    if (!ps[i]->has_value() || !(*ps[i])->defined()) continue;
    const at::Tensor& p = **ps[i];
    TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), names[i], ": expected shape (", x.size(1),
                ",) (one per channel of x), got ", p.sizes());
    TORCH_CHECK(p.device() == x.device(), names[i], ": expected device ", x.device(), ", got ", p.device());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), names[i], ": expected a floating-point dtype, got ",
                p.scalar_type());
  }
}

template <typename A>
std::vector<A> per_channel(const c10::optional<at::Tensor>& p, int64_t C, A fill) {
  std::vector<A> v(C, fill);
  if (p.has_value() && p->defined()) {
    const auto t = p->detach().to(at::kDouble).contiguous();
    const double* d = t.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<A>(d[c]);
  }
  return v;
}

bool defined(const c10::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

// x in one of the two layouts the kernels read: NCHW-contiguous or channels_last.
at::Tensor dense_layout(const at::Tensor& x, bool& cl) {
  cl = is_channels_last(x);
  if (cl || x.is_contiguous()) return x;
  return x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu) {
  check_input(x_in, weight, bias, num_groups);
  bool cl = false;
  const at::Tensor x = dense_layout(x_in, cl);
  const Geometry g = geometry(x, num_groups, cl);
  at::Tensor y = at::empty_like(x);  // same strides as x (dense)
  const auto stat_dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean_t = at::empty({g.N, g.G}, x.options().dtype(stat_dt));
  at::Tensor rstd_t = at::empty({g.N, g.G}, x.options().dtype(stat_dt));
  std::vector<double> mean(g.N * g.G), rstd(g.N * g.G);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_fwd_cpu", [&] {
    using A = opmath_t<scalar_t>;
    using V = at::vec::Vectorized<A>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    group_stats<scalar_t>(px, g, eps, mean, rstd);
    const auto w = per_channel<A>(weight, g.C, A(1));
    const auto b = per_channel<A>(bias, g.C, A(0));
    // z = (x - mean) a + bias with a = rstd w: subtracting the mean first keeps
    // full precision when rstd is large (the folded a x + b form cancels).
    std::vector<A> ca(g.N * g.C), cm(g.N * g.C), cb(g.N * g.C);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t i = n * g.G + c / g.D;
        ca[n * g.C + c] = static_cast<A>(rstd[i] * w[c]);
        cm[n * g.C + c] = static_cast<A>(mean[i]);
        cb[n * g.C + c] = b[c];
      }
    std::array<const A*, 3> coef{ca.data(), cm.data(), cb.data()};
    if (silu) {
      apply_pass<scalar_t, 3, false>(px, nullptr, y.data_ptr<scalar_t>(), coef, g,
                                     [](V xv, V, const std::array<V, 3>& c) {
                                       const V z = at::vec::fmadd(xv - c[1], c[0], c[2]);
                                       return z * sigmoid<A>(z);
                                     });
    } else {
      apply_pass<scalar_t, 3, false>(px, nullptr, y.data_ptr<scalar_t>(), coef, g,
                                     [](V xv, V, const std::array<V, 3>& c) {
                                       return at::vec::fmadd(xv - c[1], c[0], c[2]);
                                     });
    }
  });
  AT_DISPATCH_FLOATING_TYPES(stat_dt, "group_norm_silu_stats", [&] {
    scalar_t* pm = mean_t.data_ptr<scalar_t>();
    scalar_t* pr = rstd_t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.N * g.G; ++i) {
      pm[i] = static_cast<scalar_t>(mean[i]);
      pr[i] = static_cast<scalar_t>(rstd[i]);
    }
  });
  return {y, mean_t, rstd_t};
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------
template <typename T>
void backward_sums(const T* x, const T* dy, const Geometry& g, const std::vector<opmath_t<T>>& ca,
                   const std::vector<opmath_t<T>>& cm, const std::vector<opmath_t<T>>& cb, bool silu,
                   std::vector<double>& A_, std::vector<double>& B_) {
  // A_[n C + c] = sum_s dz, B_[n C + c] = sum_s dz (x - mean) (times rstd later: dz xhat).
  // z = (x - mean) a + bias.
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  auto dz_of = [silu](V xc, V dv, V a, V b) {
    if (!silu) return dv;
    const V z = at::vec::fmadd(xc, a, b);
    const V s = sigmoid<A>(z);
    return dv * s * (V(A(1)) + z * (V(A(1)) - s));
  };
  if (!g.cl) {
    const int64_t rows = g.N * g.C;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)),
                     [&](int64_t begin, int64_t end) {
      alignas(64) A bx[kBlock], bd[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        const V a(ca[r]), m(cm[r]), b(cb[r]);
        double sa = 0, sb = 0;
        for (int64_t i = 0; i < g.HW; i += kBlock) {
          const int64_t n = std::min(kBlock, g.HW - i);
          V va(A(0)), vb(A(0));
          const A* px = Blk<T, A>::load(x + r * g.HW + i, bx, n);
          const A* pd = Blk<T, A>::load(dy + r * g.HW + i, bd, n);
          for (int64_t j = 0; j < n; j += V::size()) {
            const int64_t cnt = std::min<int64_t>(V::size(), n - j);
            // Tail lanes load 0 for both x and dy, so dz = 0 there (x - m is finite).
            const V xv = V::loadu(px + j, cnt), dv = V::loadu(pd + j, cnt);
            const V xc = xv - m;
            const V dz = dz_of(xc, dv, a, b);
            va = va + dz;
            vb = at::vec::fmadd(dz, xc, vb);
          }
          sa += hsum(va);
          sb += hsum(vb);
        }
        A_[r] = sa;
        B_[r] = sb;
      }
    });
  } else {
    const int64_t C = g.C;
    const int64_t rows = std::max<int64_t>(1, kChunk / C);
    const int64_t per = (g.HW + rows - 1) / rows;
    const int64_t tasks = g.N * per;
    std::vector<double> pa(tasks * C), pb(tasks * C);
    at::parallel_for(0, tasks, task_grain(rows * C), [&](int64_t begin, int64_t end) {
      std::vector<A> acca(C), accb(C);
      std::vector<double> dacca(C), daccb(C);
      alignas(64) A bx[kBlock], bd[kBlock];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / per, ck = t % per;
        const int64_t lo = ck * rows, hi = std::min(g.HW, lo + rows);
        std::fill(acca.begin(), acca.end(), A(0));
        std::fill(accb.begin(), accb.end(), A(0));
        std::fill(dacca.begin(), dacca.end(), 0.0);
        std::fill(daccb.begin(), daccb.end(), 0.0);
        const int64_t nc = n * C;
        for (int64_t s = lo; s < hi; ++s) {
          if ((s - lo) % kFlush == 0 && s > lo) {
            for (int64_t ch = 0; ch < C; ++ch) {
              dacca[ch] += acca[ch];
              daccb[ch] += accb[ch];
              acca[ch] = accb[ch] = A(0);
            }
          }
          const int64_t off = (n * g.HW + s) * C;
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
            const int64_t len = std::min(kBlock, C - c0);
            const A* px = Blk<T, A>::load(x + off + c0, bx, len);
            const A* pd = Blk<T, A>::load(dy + off + c0, bd, len);
            for (int64_t j = 0; j < len; j += V::size()) {
              const int64_t cnt = std::min<int64_t>(V::size(), len - j);
              const int64_t ci = nc + c0 + j;
              const V xv = V::loadu(px + j, cnt), dv = V::loadu(pd + j, cnt);
              const V xc = xv - V::loadu(cm.data() + ci, cnt);
              const V dz = dz_of(xc, dv, V::loadu(ca.data() + ci, cnt), V::loadu(cb.data() + ci, cnt));
              (V::loadu(acca.data() + c0 + j, cnt) + dz).store(acca.data() + c0 + j, cnt);
              at::vec::fmadd(dz, xc, V::loadu(accb.data() + c0 + j, cnt)).store(accb.data() + c0 + j, cnt);
            }
          }
        }
        for (int64_t ch = 0; ch < C; ++ch) {
          pa[t * C + ch] = dacca[ch] + acca[ch];
          pb[t * C + ch] = daccb[ch] + accb[ch];
        }
      }
    });
    std::fill(A_.begin(), A_.end(), 0.0);
    std::fill(B_.begin(), B_.end(), 0.0);
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / per;
      for (int64_t ch = 0; ch < C; ++ch) {
        A_[n * C + ch] += pa[t * C + ch];
        B_[n * C + ch] += pb[t * C + ch];
      }
    }
  }
}

at::Tensor match_layout(const at::Tensor& t, bool cl) {
  if (!cl) return t.contiguous();
  if (is_channels_last(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean_t, const at::Tensor& rstd_t,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t num_groups,
    bool silu) {
  check_input(x_in, weight, bias, num_groups);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "grad_y: expected shape ", x_in.sizes(), " (that of x), got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x_in.device(), "grad_y: expected device ", x_in.device(), ", got ",
              grad_y.device());
  const int64_t N = x_in.size(0);
  for (const auto* p : {&mean_t, &rstd_t}) {
    const char* name = p == &mean_t ? "mean" : "rstd";
    TORCH_CHECK(p->dim() == 2 && p->size(0) == N && p->size(1) == num_groups, name, ": expected shape (",
                N, ", ", num_groups, "), got ", p->sizes());
    TORCH_CHECK(p->device() == x_in.device(), name, ": expected device ", x_in.device(), ", got ",
                p->device());
  }
  bool cl = false;
  const at::Tensor x = dense_layout(x_in, cl);
  const at::Tensor dy = match_layout(grad_y.to(x.scalar_type()), cl);
  const Geometry g = geometry(x, num_groups, cl);
  at::Tensor dx = at::empty_like(x);
  const auto md = mean_t.to(at::kDouble).contiguous();
  const auto rd = rstd_t.to(at::kDouble).contiguous();
  const double* mean = md.const_data_ptr<double>();
  const double* rstd = rd.const_data_ptr<double>();
  std::vector<double> dw(g.C, 0.0), db(g.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cpu", [&] {
    using A = opmath_t<scalar_t>;
    using V = at::vec::Vectorized<A>;
    const auto w = per_channel<A>(weight, g.C, A(1));
    const auto b = per_channel<A>(bias, g.C, A(0));
    const int64_t NC = g.N * g.C;
    std::vector<A> ca(NC), cm(NC), cb(NC);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t i = n * g.G + c / g.D, k = n * g.C + c;
        ca[k] = static_cast<A>(rstd[i] * w[c]);
        cm[k] = static_cast<A>(mean[i]);
        cb[k] = b[c];
      }
    std::vector<double> sumA(NC), sumB(NC);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    backward_sums<scalar_t>(px, pdy, g, ca, cm, cb, silu, sumA, sumB);
    for (int64_t k = 0; k < NC; ++k) sumB[k] *= rstd[k / g.C * g.G + (k % g.C) / g.D];  // sum dz xhat
    // dx = rstd (w dz - c1 - c2 (x - mean)), c1 = sum_g(w A) / M, c2 = rstd sum_g(w B) / M.
    // c1 is kept as a float pair (hi + lo): w dz - c1 then cancels exactly where it should
    // (a group of one element has dx = 0 while rstd = 1/sqrt(eps) amplifies any residue).
    std::vector<A> cw(NC), crs(NC), c1h(NC), c1l(NC), c2(NC);
    const double M = static_cast<double>(g.D * g.HW);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t k = 0; k < g.G; ++k) {
        double sa = 0, sb = 0;
        for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
          sa += w[c] * sumA[n * g.C + c];
          sb += w[c] * sumB[n * g.C + c];
        }
        const double rs = rstd[n * g.G + k];
        const A hi = static_cast<A>(sa / M);
        const A lo = static_cast<A>(sa / M - static_cast<double>(hi));
        for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
          const int64_t i = n * g.C + c;
          cw[i] = w[c];
          crs[i] = static_cast<A>(rs);
          c1h[i] = hi;
          c1l[i] = lo;
          c2[i] = static_cast<A>(rs * sb / M);
        }
      }
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        db[c] += sumA[n * g.C + c];
        dw[c] += sumB[n * g.C + c];
      }
    std::array<const A*, 8> coef{ca.data(), cm.data(), cb.data(), cw.data(),
                                 crs.data(), c1h.data(), c1l.data(), c2.data()};
    auto dx_of = [](V dz, V xc, const std::array<V, 8>& c) {
      return c[4] * (at::vec::fmsub(c[3], dz, c[5]) - c[6] - c[7] * xc);
    };
    if (silu) {
      apply_pass<scalar_t, 8, true>(px, pdy, dx.data_ptr<scalar_t>(), coef, g,
                                    [dx_of](V xv, V dv, const std::array<V, 8>& c) {
                                      const V xc = xv - c[1];
                                      const V z = at::vec::fmadd(xc, c[0], c[2]);
                                      const V s = sigmoid<A>(z);
                                      const V dz = dv * s * (V(A(1)) + z * (V(A(1)) - s));
                                      return dx_of(dz, xc, c);
                                    });
    } else {
      apply_pass<scalar_t, 8, true>(px, pdy, dx.data_ptr<scalar_t>(), coef, g,
                                    [dx_of](V xv, V dv, const std::array<V, 8>& c) {
                                      return dx_of(dv, xv - c[1], c);
                                    });
    }
  });
  auto to_param = [&](const c10::optional<at::Tensor>& p, const std::vector<double>& v) {
    if (!defined(p)) return at::empty({0}, x.options());
    at::Tensor t = at::empty({g.C}, x.options().dtype(at::kDouble));
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t.to(p->scalar_type());
  };
  // dx in x_in's layout (dense_layout copied odd strides to NCHW; dx stays NCHW then).
  return {dx, to_param(weight, dw), to_param(bias, db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("group_norm_silu_fwd", &group_norm_silu_fwd_cpu);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cpu);
}

}  // namespace fastddpm
