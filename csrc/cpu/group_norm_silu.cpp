// GroupNorm (+ SiLU) on the CPU, forward and backward, vectorised with at::vec.
//
// y = act((x + shift[n, c] - mean) * rstd * w[c] + b[c]) with mean/rstd per (n, group) of
// x + shift; shift (N, C) is optional (the U-Net adds its time embedding there, so the add
// costs no pass of its own).
//
// Work is split into tasks that depend only on the shape (never on the thread count, so
// results are bitwise the same for any number of threads):
//  * fused: a task is a whole group (NCHW, where a group is one contiguous run) or a whole
//    sample (channels_last). It reads its data from memory once for the sums and then again
//    from cache for the centred squares and for the output, so the op moves one read and one
//    write of x. Used when a task fits in a core's L2 and there are enough tasks.
//  * split: otherwise (large groups, or a channels_last batch too small to fill the cores)
//    tasks are pieces of groups / runs of positions, and each pass is its own parallel loop
//    with per-task partial sums combined in a fixed order.
// Statistics: the fused plans make two passes over data in cache (mean, then centred squares
// with the rounding of the mean corrected); the split plan makes one pass over memory (shifted
// sums about the group's first element). Both accumulate in fp32 vectors flushed to double.
//
// Backward: per (n, c) A = sum dz, B = sum dz (x - cm), S = sum (x - cm) (shift's gradient),
// with cm = mean - shift and z, dz recomputed from x (the fused path keeps dz of the task in a
// scratch buffer between its two passes); then dx = rstd (w dz - c1 - c2 (x - cm)) (see
// fastddpm/ops/group_norm_silu.py for the formulas).
//
// float64 inputs are computed in double (gradcheck runs on the kernel itself); the public
// function routes float64 to the reference.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "fastddpm/checks.h"
#include "fastddpm/cpu_vec.h"

namespace fastddpm {
namespace {

// A fused task holds at most this many elements (NCHW group; 128 KiB of fp32).
constexpr int64_t kFuseGroup = 32768;
// channels_last: a sample of at most this many elements is one task (512 KiB of fp32: fits a
// 1-2 MiB L2 together with its output) when the batch has at least kFuseMinSamples samples.
constexpr int64_t kFuseSample = 131072;
constexpr int64_t kFuseMinSamples = 4;
// Elements per task on the split path; also the least work worth a second thread.
constexpr int64_t kChunk = 16384;
// channels_last: fp32 per-channel accumulators are flushed to double every kFlush positions.
constexpr int64_t kFlush = 16;

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Stack buffers for the conversion to the compute type: unused (one element) when T is already
// it. (8 KiB frames would be stack-probed page by page on every call.)
template <typename T>
constexpr int64_t kBuf = std::is_same_v<T, opmath_t<T>> ? 1 : kBlock;

#if defined(CPU_CAPABILITY_AVX512)
// exp(-z) for z >= -87: 2^t with t = -z log2 e = n + f, n = round(t), |f| <= 1/2, 2^f by a degree-6
// polynomial fitted for relative error (9.6e-8 with fp32 evaluation, measured on 2e5 points), scaled
// by 2^n with vscalefps (which also gives 0 below the float range). 10 instructions against
// exp_u20's ~16: the SiLU forward is instruction-bound, not memory-bound.
inline __m512 exp_neg(__m512 z) {
  const __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5345807e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399932e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184891e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// silu and its derivative: the expressions of silu() and silu_backward() in elementwise.h (which the
// CUDA kernels call), on at::vec vectors.
// sigmoid(z). fp32: a fast exp and a reciprocal estimate refined by a Newton step instead of a
// division (a 512-bit divide issues once per ~10 cycles and would bound the whole op); z is
// clamped at -80, where sigmoid is 1.8e-35 (so exp(-z) stays finite). A NaN z stays NaN in
// silu = z sigmoid(z) and in its derivative, which multiply by z.
template <typename A>
inline at::vec::Vectorized<A> sigmoid(const at::vec::Vectorized<A>& z) {
  using V = at::vec::Vectorized<A>;
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 zc = _mm512_max_ps(_mm512_set1_ps(-80.f), z);  // max(c, NaN) = NaN
    const __m512 d = _mm512_add_ps(exp_neg(zc), _mm512_set1_ps(1.f));
    const __m512 r = _mm512_rcp14_ps(d);                                   // 14 bits
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));  // 28 bits
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 zc = _mm256_max_ps(_mm256_set1_ps(-80.f), z);
    const __m256 d = _mm256_add_ps(V(zc).neg().exp_u20(), _mm256_set1_ps(1.f));
    __m256 r = _mm256_rcp_ps(d);                                        // 12 bits
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));  // 24 bits
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
#else
    return V(1.f) / (V(1.f) + z.neg().exp_u20());
#endif
  } else {
    return V(A(1)) / (V(A(1)) + z.neg().exp());
  }
}

// The activation and its derivative factor: y = act(z); dz = dy * act'(z).
template <typename A, bool SILU>
inline at::vec::Vectorized<A> act(const at::vec::Vectorized<A>& z) {
  if constexpr (SILU) {
    return z * sigmoid<A>(z);
  } else {
    return z;
  }
}

template <typename A, bool SILU>
inline at::vec::Vectorized<A> act_grad(const at::vec::Vectorized<A>& z, const at::vec::Vectorized<A>& dy) {
  using V = at::vec::Vectorized<A>;
  if constexpr (SILU) {
    const V s = sigmoid<A>(z);
    return dy * s * (V(A(1)) + z * (V(A(1)) - s));
  } else {
    return dy;
  }
}

// sum of n elements of p (converted in blocks), in double.
template <typename T>
double sum_run(const T* p, int64_t n) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  alignas(64) A buf[kBuf<T>];
  double s = 0;
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t len = std::min(kBlock, n - i);
    const A* q = ComputeBlock<T, A>::load(p + i, buf, len);
    V a0(A(0)), a1(A(0));
    int64_t j = 0;
    for (; j + 2 * V::size() <= len; j += 2 * V::size()) {
      a0 = a0 + V::loadu(q + j);
      a1 = a1 + V::loadu(q + j + V::size());
    }
    A t = 0;
    for (; j < len; ++j) t += q[j];
    s += hsum(a0 + a1) + t;
  }
  return s;
}

// sum (p - c) and sum (p - c)^2 over n elements, added to s1, s2 (double).
template <typename T>
void centred_run(const T* p, int64_t n, opmath_t<T> c, double& s1, double& s2) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  alignas(64) A buf[kBuf<T>];
  const V vc(c);
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t len = std::min(kBlock, n - i);
    const A* q = ComputeBlock<T, A>::load(p + i, buf, len);
    V a0(A(0)), a1(A(0)), b0(A(0)), b1(A(0));
    int64_t j = 0;
    for (; j + 2 * V::size() <= len; j += 2 * V::size()) {
      const V d0 = V::loadu(q + j) - vc, d1 = V::loadu(q + j + V::size()) - vc;
      a0 = a0 + d0;
      a1 = a1 + d1;
      b0 = at::vec::fmadd(d0, d0, b0);
      b1 = at::vec::fmadd(d1, d1, b1);
    }
    A t1 = 0, t2 = 0;
    for (; j < len; ++j) {
      const A d = q[j] - c;
      t1 += d;
      t2 += d * d;
    }
    s1 += hsum(a0 + a1) + t1;
    s2 += hsum(b0 + b1) + t2;
  }
}

// y = act((x - m) a + b) over n contiguous elements.
template <typename T, bool SILU>
void apply_run(const T* x, T* y, int64_t n, opmath_t<T> a, opmath_t<T> m, opmath_t<T> b) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  alignas(64) A bx[kBuf<T>], by[kBuf<T>];
  const V va(a), vm(m), vb(b);
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t len = std::min(kBlock, n - i);
    const A* q = ComputeBlock<T, A>::load(x + i, bx, len);
    A* o = ComputeBlock<T, A>::out(y + i, by);
    int64_t j = 0;
    for (; j + 2 * V::size() <= len; j += 2 * V::size()) {  // two chains in flight
      const V z0 = at::vec::fmadd(V::loadu(q + j) - vm, va, vb);
      const V z1 = at::vec::fmadd(V::loadu(q + j + V::size()) - vm, va, vb);
      act<A, SILU>(z0).store(o + j);
      act<A, SILU>(z1).store(o + j + V::size());
    }
    for (; j + V::size() <= len; j += V::size())
      act<A, SILU>(at::vec::fmadd(V::loadu(q + j) - vm, va, vb)).store(o + j);
    if (j < len) act<A, SILU>(at::vec::fmadd(V::loadu(q + j, len - j) - vm, va, vb)).store(o + j, len - j);
    ComputeBlock<T, A>::store(y + i, o, len);
  }
}

// y = act((x - cm[c]) ca[c] + cb[c]) over a group's run of D channels of HW positions each, HW a
// multiple of the vector width (every vector then lies in one channel): four independent vectors
// per iteration, whatever HW is (at 4x4 a channel is a single vector).
//
// pf, when given, is the run of the group the caller reads next: its cache lines are prefetched
// (one per 64 bytes of this run) while this one computes, so the next group's first pass reads
// from cache instead of stalling on memory.
template <typename T, bool SILU>
void apply_group(const T* x, T* y, int64_t D, int64_t HW, const opmath_t<T>* ca, const opmath_t<T>* cm,
                 const opmath_t<T>* cb, const T* pf) {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t VS = V::size();
  static_assert(kBlock % (4 * VS) == 0, "blocks hold whole groups of four vectors");
  const int64_t vpc = HW / VS;  // vectors per channel
  int64_t c = 0, k = 0;         // channel of the next vector, and its index within the channel
  auto next = [&] {
    const int64_t cur = c;
    if (++k == vpc) {
      k = 0;
      ++c;
    }
    return cur;
  };
  auto z_of = [&](const A* q, int64_t ch) {
    return at::vec::fmadd(V::loadu(q) - V(cm[ch]), V(ca[ch]), V(cb[ch]));
  };
  alignas(64) A bx[kBuf<T>], by[kBuf<T>];
  const int64_t n = D * HW;
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t len = std::min(kBlock, n - i);
    const A* q = ComputeBlock<T, A>::load(x + i, bx, len);
    A* o = ComputeBlock<T, A>::out(y + i, by);
    int64_t j = 0;
    for (; j + 4 * VS <= len; j += 4 * VS) {
      if (pf) {
        for (int64_t l = 0; l < static_cast<int64_t>(4 * VS * sizeof(T)); l += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(pf + i + j) + l, 0, 3);
      }
      const int64_t c0 = next(), c1 = next(), c2 = next(), c3 = next();
      const V z0 = z_of(q + j, c0), z1 = z_of(q + j + VS, c1), z2 = z_of(q + j + 2 * VS, c2),
              z3 = z_of(q + j + 3 * VS, c3);
      act<A, SILU>(z0).store(o + j);
      act<A, SILU>(z1).store(o + j + VS);
      act<A, SILU>(z2).store(o + j + 2 * VS);
      act<A, SILU>(z3).store(o + j + 3 * VS);
    }
    for (; j < len; j += VS) act<A, SILU>(z_of(q + j, next())).store(o + j);
    ComputeBlock<T, A>::store(y + i, o, len);
  }
}

struct Geometry {
  int64_t N, C, G, D, HW;  // D = C / G channels per group, HW = spatial size
  bool cl;                 // channels_last: x viewed as (N, HW, C); else (N, C, HW)
  int64_t M() const { return D * HW; }
};

// The task decomposition (see the top of the file); a function of the shape only.
struct Plan {
  bool fused;
  int64_t per;    // tasks per group (NCHW) or per sample (channels_last)
  int64_t len;    // elements (NCHW) or positions (channels_last) per task
  int64_t tasks;
  int64_t grain;  // parallel_for grain in tasks: small inputs stay on the calling thread
};

Plan make_plan(const Geometry& g) {
  Plan p;
  int64_t task_elems;
  if (!g.cl) {
    p.fused = g.M() <= kFuseGroup;
    p.len = p.fused ? g.M() : kChunk;
    p.per = p.fused ? 1 : (g.M() + p.len - 1) / p.len;
    p.tasks = g.N * g.G * p.per;
    task_elems = p.len;
  } else {
    p.fused = g.HW * g.C <= kFuseSample && g.N >= kFuseMinSamples;
    p.len = p.fused ? g.HW : std::max<int64_t>(1, kChunk / std::max<int64_t>(g.C, 1));
    p.per = p.fused ? 1 : (g.HW + p.len - 1) / p.len;
    p.tasks = g.N * p.per;
    task_elems = p.len * g.C;
  }
  p.grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(task_elems, 1));
  return p;
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

// Per-(n, c) or per-channel values read straight from a tensor of any floating dtype and strides.
template <typename A>
void read_param(const std::optional<at::Tensor>& p, int64_t C, A fill, std::vector<A>& out) {
  out.assign(C, fill);
  if (!p.has_value() || !p->defined()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p->scalar_type(), "read_param", [&] {
    const scalar_t* d = p->const_data_ptr<scalar_t>();
    const int64_t s = p->stride(0);
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<A>(d[c * s]);
  });
}

template <typename A>
void read_shift(const std::optional<at::Tensor>& p, int64_t N, int64_t C, std::vector<A>& out) {
  out.assign(N * C, A(0));
  if (!p.has_value() || !p->defined()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p->scalar_type(), "read_shift", [&] {
    const scalar_t* d = p->const_data_ptr<scalar_t>();
    const int64_t s0 = p->stride(0), s1 = p->stride(1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<A>(d[n * s0 + c * s1]);
  });
}

bool defined(const std::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

// ---------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------
template <typename T, bool SILU>
struct Forward {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  const T* x;
  T* y;
  Geometry g;
  Plan plan;
  double eps;
  const A* w;      // (C)
  const A* b;      // (C)
  const A* shift;  // (N, C), zeros when absent
  bool has_shift;
  // (N, G) statistics of x + shift: scratch of the channels_last and split plans (allocated
  // uninitialised by the caller; the channels_last fused plan's workers write them, so no core
  // owns their cache lines first; the split plan fills them on the calling thread).
  double* mean;
  double* rstd;
  // The statistics handed back (may be null); the fused NCHW plan writes them from its workers.
  A* mean_out;
  A* rstd_out;

  A sh_at(int64_t n, int64_t c) const { return has_shift ? shift[n * g.C + c] : A(0); }
  double inv_M = 1.0 / static_cast<double>(std::max<int64_t>(g.M(), 1));

  // NCHW task t: group t / per, the piece [lo, hi) of its run.
  void piece(int64_t t, int64_t& grp, int64_t& lo, int64_t& hi) const {
    grp = t / plan.per;
    lo = (t % plan.per) * plan.len;
    hi = std::min(g.M(), lo + plan.len);
  }
  // channels_last task t: sample t / per, positions [lo, hi).
  void rows(int64_t t, int64_t& n, int64_t& lo, int64_t& hi) const {
    n = t / plan.per;
    lo = (t % plan.per) * plan.len;
    hi = std::min(g.HW, lo + plan.len);
  }

  // channels_last fused plan, pass 1: the sum of x + shift over sample t, per group (out[0..G)).
  // (The NCHW plans never call it: the fused one sums in groups_fused, the split one in squares.)
  void sums(int64_t t, double* out, std::vector<A>& acc, std::vector<double>& dacc) const {
    int64_t n, lo, hi;
    rows(t, n, lo, hi);
    channel_sums(n, lo, hi, nullptr, acc, dacc, nullptr);
    for (int64_t k = 0; k < g.G; ++k) {
      double s = 0;
      for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c)
        s += dacc[c] + static_cast<double>(sh_at(n, c)) * static_cast<double>(hi - lo);
      out[k] = s;
    }
  }

  // channels_last: per-channel sums over positions [lo, hi) of sample n of (x - centre[c])
  // into dacc (and of its square into dacc2 when given).
  void channel_sums(int64_t n, int64_t lo, int64_t hi, const A* centre, std::vector<A>& acc,
                    std::vector<double>& dacc, std::vector<double>* dacc2) const {
    const int64_t C = g.C;
    acc.assign(2 * C, A(0));
    dacc.assign(C, 0.0);
    if (dacc2) dacc2->assign(C, 0.0);
    A* a1 = acc.data();
    A* a2 = acc.data() + C;
    alignas(64) A buf[kBuf<T>];
    auto flush = [&] {
      for (int64_t c = 0; c < C; ++c) {
        dacc[c] += a1[c];
        a1[c] = A(0);
        if (dacc2) {
          (*dacc2)[c] += a2[c];
          a2[c] = A(0);
        }
      }
    };
    for (int64_t s = lo; s < hi; ++s) {
      if (s > lo && (s - lo) % kFlush == 0) flush();
      const T* row = x + (n * g.HW + s) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t len = std::min(kBlock, C - c0);
        const A* q = ComputeBlock<T, A>::load(row + c0, buf, len);
        int64_t j = 0;
        for (; j < len; j += V::size()) {
          const int64_t cnt = std::min<int64_t>(V::size(), len - j);
          V d = V::loadu(q + j, cnt);
          if (centre) d = d - V::loadu(centre + c0 + j, cnt);
          (V::loadu(a1 + c0 + j, cnt) + d).store(a1 + c0 + j, cnt);
          if (dacc2) at::vec::fmadd(d, d, V::loadu(a2 + c0 + j, cnt)).store(a2 + c0 + j, cnt);
        }
      }
    }
    flush();
  }

  // The centre of channel c of sample n: the group's mean minus the shift.
  A centre(int64_t n, int64_t c) const {
    return static_cast<A>(mean[n * g.G + c / g.D] - static_cast<double>(sh_at(n, c)));
  }

  // The sum of x + shift - mean and of its square, per group the task touches (mean[] holds the
  // group's mean, or, on the split plan, the shift K of its one-pass sums).
  void squares(int64_t t, double* o1, double* o2, std::vector<A>& acc, std::vector<double>& dacc,
               std::vector<double>& dacc2, std::vector<A>& cen) const {
    if (!g.cl) {
      int64_t grp, lo, hi;
      piece(t, grp, lo, hi);
      const int64_t n = grp / g.G, c0 = (grp % g.G) * g.D;
      double s1 = 0, s2 = 0;
      if (!has_shift) {
        centred_run(x + grp * g.M() + lo, hi - lo, centre(n, c0), s1, s2);
      } else {
        for (int64_t i = lo; i < hi;) {
          const int64_t d = i / g.HW, e = std::min(hi, (d + 1) * g.HW);
          centred_run(x + grp * g.M() + i, e - i, centre(n, c0 + d), s1, s2);
          i = e;
        }
      }
      o1[0] = s1;
      o2[0] = s2;
      return;
    }
    int64_t n, lo, hi;
    rows(t, n, lo, hi);
    cen.resize(g.C);
    for (int64_t c = 0; c < g.C; ++c) cen[c] = centre(n, c);
    channel_sums(n, lo, hi, cen.data(), acc, dacc, &dacc2);
    for (int64_t k = 0; k < g.G; ++k) {
      double s1 = 0, s2 = 0;
      for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
        s1 += dacc[c];
        s2 += dacc2[c];
      }
      o1[k] = s1;
      o2[k] = s2;
    }
  }

  // Pass 3: the output of the task.
  void apply(int64_t t, std::vector<A>& coef) const {
    if (!g.cl) {
      int64_t grp, lo, hi;
      piece(t, grp, lo, hi);
      const int64_t n = grp / g.G, c0 = (grp % g.G) * g.D;
      const double r = rstd[grp];
      for (int64_t i = lo; i < hi;) {
        const int64_t d = i / g.HW, e = std::min(hi, (d + 1) * g.HW);
        const int64_t c = c0 + d;
        apply_run<T, SILU>(x + grp * g.M() + i, y + grp * g.M() + i, e - i,
                           static_cast<A>(r * static_cast<double>(w[c])), centre(n, c), b[c]);
        i = e;
      }
      return;
    }
    int64_t n, lo, hi;
    rows(t, n, lo, hi);
    const int64_t C = g.C;
    coef.resize(3 * C);
    A* ca = coef.data();
    A* cm = ca + C;
    A* cb = cm + C;
    for (int64_t c = 0; c < C; ++c) {
      ca[c] = static_cast<A>(rstd[n * g.G + c / g.D] * static_cast<double>(w[c]));
      cm[c] = centre(n, c);
      cb[c] = b[c];
    }
    alignas(64) A bx[kBuf<T>], by[kBuf<T>];
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t off = (n * g.HW + s) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t len = std::min(kBlock, C - c0);
        const A* q = ComputeBlock<T, A>::load(x + off + c0, bx, len);
        A* o = ComputeBlock<T, A>::out(y + off + c0, by);
        int64_t j = 0;
        for (; j + V::size() <= len; j += V::size()) {
          const int64_t c = c0 + j;
          act<A, SILU>(at::vec::fmadd(V::loadu(q + j) - V::loadu(cm + c), V::loadu(ca + c), V::loadu(cb + c)))
              .store(o + j);
        }
        if (j < len) {
          const int64_t cnt = len - j, c = c0 + j;
          act<A, SILU>(at::vec::fmadd(V::loadu(q + j, cnt) - V::loadu(cm + c, cnt), V::loadu(ca + c, cnt),
                                      V::loadu(cb + c, cnt)))
              .store(o + j, cnt);
        }
        ComputeBlock<T, A>::store(y + off + c0, o, len);
      }
    }
  }

  // NCHW, fused: all three passes over group grp (its run is in cache after the first).
  // NCHW, fused: all three passes over groups [g0, g1) (at most kBatch). Each pass runs over every
  // group of the batch before the next pass starts, so the groups' dependency chains (sum -> mean
  // -> centred sums -> sqrt -> output) overlap instead of stalling one after the other: small
  // groups (256 x 4 x 4: 8 vectors a group) are otherwise latency-bound. The batch's data stays in
  // L1/L2 between the passes.
  static constexpr int64_t kBatch = 8;
  void groups_fused(int64_t g0, int64_t g1, int64_t gend, std::vector<A>& coef) const {
    const int64_t M = g.M(), HW = g.HW, D = g.D;
    double mu[kBatch], rs[kBatch];
    for (int64_t grp = g0; grp < g1; ++grp) {
      double s = sum_run(x + grp * M, M);
      if (has_shift) {
        const A* sh = shift + (grp / g.G) * g.C + (grp % g.G) * D;
        double t = 0;
        for (int64_t d = 0; d < D; ++d) t += static_cast<double>(sh[d]);
        s += t * static_cast<double>(HW);
      }
      mu[grp - g0] = s * inv_M;
    }
    for (int64_t grp = g0; grp < g1; ++grp) {
      const T* xg = x + grp * M;
      double s1 = 0, s2 = 0;
      if (!has_shift) {
        centred_run(xg, M, static_cast<A>(mu[grp - g0]), s1, s2);
      } else {
        const A* sh = shift + (grp / g.G) * g.C + (grp % g.G) * D;
        for (int64_t d = 0; d < D; ++d)
          centred_run(xg + d * HW, HW, static_cast<A>(mu[grp - g0] - static_cast<double>(sh[d])), s1, s2);
      }
      rs[grp - g0] = rstd_of(s1, s2);
    }
    coef.resize(2 * D);
    A *ca = coef.data(), *cm = ca + D;
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t n = grp / g.G, c0 = (grp % g.G) * D;
      const double m = mu[grp - g0], r = rs[grp - g0];
      if (mean_out) {
        mean_out[grp] = static_cast<A>(m);
        rstd_out[grp] = static_cast<A>(r);
      }
      for (int64_t d = 0; d < D; ++d) {
        ca[d] = static_cast<A>(r * static_cast<double>(w[c0 + d]));
        cm[d] = static_cast<A>(m - static_cast<double>(sh_at(n, c0 + d)));
      }
      const T* xg = x + grp * M;
      T* yg = y + grp * M;
      if (HW % V::size() == 0) {
        // Prefetch the group of the next batch that takes this group's place.
        const T* pf = grp + kBatch < gend ? x + (grp + kBatch) * M : nullptr;
        apply_group<T, SILU>(xg, yg, D, HW, ca, cm, b + c0, pf);
      } else {
        for (int64_t d = 0; d < D; ++d) apply_run<T, SILU>(xg + d * HW, yg + d * HW, HW, ca[d], cm[d], b[c0 + d]);
      }
    }
  }

  // Mean and rstd of group i from its sum, and from its centred sums.
  void set_mean(int64_t i, double s) const { mean[i] = s * inv_M; }
  void set_rstd(int64_t i, double s1, double s2) const { rstd[i] = rstd_of(s1, s2); }
  double rstd_of(double s1, double s2) const {
    // Sums centred on c: var = (s2 - s1^2 / M) / M. With c the mean (fused plans) s1 is ~0 and the
    // term corrects for the mean's rounding; with c a shift K (split plan) it removes K.
    const double var = std::max((s2 - s1 * s1 * inv_M) * inv_M, 0.0);
    return 1.0 / std::sqrt(var + eps);
  }
  // Statistics of the scratch-based plans into the outputs (on the calling thread).
  void copy_out() const {
    if (!mean_out) return;
    for (int64_t i = 0; i < g.N * g.G; ++i) {
      mean_out[i] = static_cast<A>(mean[i]);
      rstd_out[i] = static_cast<A>(rstd[i]);
    }
  }

  void run() const {
    const int64_t Gp = g.cl ? g.G : 1;  // groups per task
    if (plan.fused && !g.cl) {
      at::parallel_for(0, plan.tasks, plan.grain, [&](int64_t begin, int64_t end) {
        std::vector<A> coef;
        for (int64_t t = begin; t < end; t += kBatch) groups_fused(t, std::min(end, t + kBatch), end, coef);
      });
      return;
    }
    if (plan.fused) {
      at::parallel_for(0, plan.tasks, plan.grain, [&](int64_t begin, int64_t end) {
        std::vector<A> acc, cen;
        std::vector<double> dacc, dacc2, s(Gp), s1(Gp), s2(Gp);
        for (int64_t t = begin; t < end; ++t) {
          // A fused task is one group (NCHW) or one sample's G groups (CL): its groups are t * Gp + k.
          sums(t, s.data(), acc, dacc);
          for (int64_t k = 0; k < Gp; ++k) set_mean(t * Gp + k, s[k]);
          squares(t, s1.data(), s2.data(), acc, dacc, dacc2, cen);
          for (int64_t k = 0; k < Gp; ++k) set_rstd(t * Gp + k, s1[k], s2[k]);
          apply(t, acc);
        }
      });
      copy_out();
      return;
    }
    // Split: one pass over memory for the statistics. The pieces sum x + shift - K and its
    // square (shifted sums), K written to mean[] so that centre() yields K - shift.
    const int64_t T_ = plan.tasks;
    const int64_t NG = g.N * g.G;
    // K is the mean of (up to) the first 64 positions of the group's first channel, rounded to A:
    // the variance's rounding error grows with ((mean - K) / sigma)^2, and one element could be
    // an outlier.
    std::vector<double> K(NG);
    const int64_t nk = std::min<int64_t>(g.HW, 64);
    for (int64_t i = 0; i < NG; ++i) {
      const int64_t n = i / g.G, c0 = (i % g.G) * g.D;
      double k = 0;
      for (int64_t s = 0; s < nk; ++s)
        k += static_cast<double>(g.cl ? x[(n * g.HW + s) * g.C + c0] : x[i * g.M() + s]);
      K[i] = static_cast<double>(static_cast<A>(k / static_cast<double>(std::max<int64_t>(nk, 1)) +
                                                static_cast<double>(sh_at(n, c0))));
      mean[i] = K[i];
    }
    std::vector<double> p1(T_ * Gp), p2(T_ * Gp);
    at::parallel_for(0, T_, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> acc, cen;
      std::vector<double> dacc, dacc2;
      for (int64_t t = begin; t < end; ++t) squares(t, p1.data() + t * Gp, p2.data() + t * Gp, acc, dacc, dacc2, cen);
    });
    // Group i's partials in a fixed order: NCHW tasks i * per .. ; CL tasks n * per .., slot k.
    auto combine = [&](const std::vector<double>& p, int64_t i) {
      double s = 0;
      if (!g.cl) {
        for (int64_t j = 0; j < plan.per; ++j) s += p[i * plan.per + j];
      } else {
        const int64_t n = i / g.G, k = i % g.G;
        for (int64_t j = 0; j < plan.per; ++j) s += p[(n * plan.per + j) * g.G + k];
      }
      return s;
    };
    for (int64_t i = 0; i < NG; ++i) {
      const double s1 = combine(p1, i);
      // With a shift, the centres K - shift[c] were rounded to A: add back what that rounding
      // took from the sum, so the mean is that of x + shift to double precision.
      double corr = 0;
      if (has_shift) {
        const int64_t n = i / g.G, c0 = (i % g.G) * g.D;
        for (int64_t c = c0; c < c0 + g.D; ++c)
          corr += static_cast<double>(centre(n, c)) + static_cast<double>(sh_at(n, c)) - K[i];
        corr *= static_cast<double>(g.HW);
      }
      set_rstd(i, s1, combine(p2, i));
      mean[i] = K[i] + (s1 + corr) * inv_M;
    }
    at::parallel_for(0, T_, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> coef;
      for (int64_t t = begin; t < end; ++t) apply(t, coef);
    });
    copy_out();
  }
};

// x in one of the two layouts the kernels read: NCHW-contiguous or channels_last.
at::Tensor dense_layout(const at::Tensor& x, bool& cl) {
  cl = is_channels_last_dense(x);
  if (cl || x.is_contiguous()) return x;
  return x.contiguous();
}

// The forward into y; with_stats: also the (N, G) mean and rstd of x + shift (float32, or float64
// for float64 x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu, bool with_stats) {
  check_group_norm_silu_fwd_args(x_in, weight, bias, shift, num_groups, eps, at::kCPU, /*allow_double=*/true);
  bool cl = false;
  const at::Tensor x = dense_layout(x_in, cl);
  const Geometry g = geometry(x, num_groups, cl);
  at::Tensor y = at::empty_like(x);  // same strides as x (dense)
  // The statistics are written in full below: allocated without the dispatcher (a per-call cost
  // that shows at small shapes).
  at::Tensor mean_t, rstd_t;
  if (with_stats) {
    const auto stat_dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    mean_t = at::detail::empty_cpu({g.N, g.G}, stat_dt);
    rstd_t = at::detail::empty_cpu({g.N, g.G}, stat_dt);
  }
  const int64_t NG = g.N * g.G;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_fwd_cpu", [&] {
    using A = opmath_t<scalar_t>;
    A* mo = with_stats ? mean_t.data_ptr<A>() : nullptr;
    A* ro = with_stats ? rstd_t.data_ptr<A>() : nullptr;
    if (g.M() == 0 || g.N == 0) {  // empty groups: nothing to normalise
      for (int64_t i = 0; with_stats && i < NG; ++i) {
        mo[i] = A(0);
        ro[i] = static_cast<A>(1.0 / std::sqrt(eps));
      }
      return;
    }
    std::vector<A> w, b, sh;
    read_param<A>(weight, g.C, A(1), w);
    read_param<A>(bias, g.C, A(0), b);
    if (defined(shift)) read_shift<A>(shift, g.N, g.C, sh);
    const Plan plan = make_plan(g);
    std::unique_ptr<double[]> mean, rstd;  // scratch of the plans that need it, uninitialised
    if (!(plan.fused && !g.cl)) {
      mean.reset(new double[NG]);
      rstd.reset(new double[NG]);
    }
    auto go = [&](auto silu_tag) {
      constexpr bool S = decltype(silu_tag)::value;
      Forward<scalar_t, S>{x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, plan, eps, w.data(),
                           b.data(), defined(shift) ? sh.data() : nullptr, defined(shift), mean.get(), rstd.get(),
                           mo, ro}
          .run();
    };
    if (silu)
      go(std::true_type{});
    else
      go(std::false_type{});
  });
  return {y, mean_t, rstd_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu) {
  return forward_cpu(x, weight, bias, shift, num_groups, eps, silu, true);
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
                               int64_t num_groups, double eps, bool silu) {
  return std::get<0>(forward_cpu(x, weight, bias, shift, num_groups, eps, silu, false));
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------
template <typename T, bool SILU>
struct Backward {
  using A = opmath_t<T>;
  using V = at::vec::Vectorized<A>;
  const T* x;
  const T* dy;
  T* dx;
  Geometry g;
  Plan plan;
  bool want_s;      // accumulate S = sum (x - cm) (shift's gradient)
  const double* mean;  // (N, G)
  const double* rstd;
  const A* w;       // (C)
  const A* b;
  const A* shift;   // (N, C), or null
  // Per (n, c) sums, written by the tasks (fused) or combined from partials (split).
  double* SA;
  double* SB;
  double* SS;
  // Per (n, c) coefficients of dx, written once a group's sums are known.
  A* c_rs;
  A* c1h;
  A* c1l;
  A* c2;

  A ca(int64_t n, int64_t c) const { return static_cast<A>(rstd[n * g.G + c / g.D] * static_cast<double>(w[c])); }
  A cm(int64_t n, int64_t c) const {
    const double s = shift ? static_cast<double>(shift[n * g.C + c]) : 0.0;
    return static_cast<A>(mean[n * g.G + c / g.D] - s);
  }

  // Sums of dz, dz (x - cm) and (x - cm) over n contiguous elements of one channel; dz is also
  // stored to `keep` when given.
  void run_sums(const T* px, const T* pd, int64_t n, A a, A m, A bb, double& sa, double& sb, double& ss,
                A* keep) const {
    alignas(64) A bx[kBuf<T>], bd[kBuf<T>];
    const V va(a), vm(m), vb(bb);
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t len = std::min(kBlock, n - i);
      const A* q = ComputeBlock<T, A>::load(px + i, bx, len);
      const A* r = ComputeBlock<T, A>::load(pd + i, bd, len);
      V acc_a(A(0)), acc_b(A(0)), acc_s(A(0));
      for (int64_t j = 0; j < len; j += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), len - j);
        // Tail lanes load 0 for x and dy: dz = 0 there, but x - m is not, so S masks them.
        const V xc = V::loadu(q + j, cnt) - vm;
        const V dz = act_grad<A, SILU>(at::vec::fmadd(xc, va, vb), V::loadu(r + j, cnt));
        acc_a = acc_a + dz;
        acc_b = at::vec::fmadd(dz, xc, acc_b);
        if (want_s) acc_s = acc_s + (cnt == V::size() ? xc : V::set(V(A(0)), xc, cnt));
        if (keep) {
          if (cnt == V::size())
            dz.store(keep + i + j);
          else
            dz.store(keep + i + j, cnt);
        }
      }
      sa += hsum(acc_a);
      sb += hsum(acc_b);
      if (want_s) ss += hsum(acc_s);
    }
  }

  // dx = rs (w dz - c1 - c2 (x - cm)) over n contiguous elements of one channel.
  void run_dx(const T* px, const T* pd, T* po, int64_t n, A a, A m, A bb, A wc, A rs, A h, A l, A k2,
              const A* kept) const {
    alignas(64) A bx[kBuf<T>], bd[kBuf<T>], bo[kBuf<T>];
    const V va(a), vm(m), vb(bb), vw(wc), vr(rs), vh(h), vl(l), v2(k2);
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t len = std::min(kBlock, n - i);
      const A* q = ComputeBlock<T, A>::load(px + i, bx, len);
      const A* r = kept ? nullptr : ComputeBlock<T, A>::load(pd + i, bd, len);
      A* o = ComputeBlock<T, A>::out(po + i, bo);
      for (int64_t j = 0; j < len; j += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), len - j);
        const V xc = V::loadu(q + j, cnt) - vm;
        const V dz = kept ? V::loadu(kept + i + j, cnt)
                          : act_grad<A, SILU>(at::vec::fmadd(xc, va, vb), V::loadu(r + j, cnt));
        const V res = vr * (at::vec::fmsub(vw, dz, vh) - vl - v2 * xc);
        if (cnt == V::size())
          res.store(o + j);
        else
          res.store(o + j, cnt);
      }
      ComputeBlock<T, A>::store(po + i, o, len);
    }
  }

  // channels_last rows [lo, hi) of sample n: per-channel sums into da/db/ds (size C), dz to keep.
  void cl_sums(int64_t n, int64_t lo, int64_t hi, std::vector<A>& acc, double* da, double* db, double* ds,
               A* keep) const {
    const int64_t C = g.C;
    acc.assign(6 * C, A(0));
    A *a1 = acc.data(), *a2 = a1 + C, *a3 = a2 + C, *vca = a3 + C, *vcm = vca + C, *vcb = vcm + C;
    for (int64_t c = 0; c < C; ++c) {
      vca[c] = ca(n, c);
      vcm[c] = cm(n, c);
      vcb[c] = b[c];
      da[c] = db[c] = ds[c] = 0.0;
    }
    auto flush = [&] {
      for (int64_t c = 0; c < C; ++c) {
        da[c] += a1[c];
        db[c] += a2[c];
        ds[c] += a3[c];
        a1[c] = a2[c] = a3[c] = A(0);
      }
    };
    alignas(64) A bx[kBuf<T>], bd[kBuf<T>];
    for (int64_t s = lo; s < hi; ++s) {
      if (s > lo && (s - lo) % kFlush == 0) flush();
      const int64_t off = (n * g.HW + s) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t len = std::min(kBlock, C - c0);
        const A* q = ComputeBlock<T, A>::load(x + off + c0, bx, len);
        const A* r = ComputeBlock<T, A>::load(dy + off + c0, bd, len);
        for (int64_t j = 0; j < len; j += V::size()) {
          const int64_t cnt = std::min<int64_t>(V::size(), len - j);
          const int64_t c = c0 + j;
          const V xc = V::loadu(q + j, cnt) - V::loadu(vcm + c, cnt);
          const V dz = act_grad<A, SILU>(at::vec::fmadd(xc, V::loadu(vca + c, cnt), V::loadu(vcb + c, cnt)),
                                         V::loadu(r + j, cnt));
          (V::loadu(a1 + c, cnt) + dz).store(a1 + c, cnt);
          at::vec::fmadd(dz, xc, V::loadu(a2 + c, cnt)).store(a2 + c, cnt);
          if (want_s) (V::loadu(a3 + c, cnt) + xc).store(a3 + c, cnt);
          if (keep) dz.store(keep + (s - lo) * C + c, cnt);
        }
      }
    }
    flush();
  }

  void cl_dx(int64_t n, int64_t lo, int64_t hi, std::vector<A>& coef, const A* kept) const {
    const int64_t C = g.C;
    coef.resize(8 * C);
    A *vca = coef.data(), *vcm = vca + C, *vcb = vcm + C, *vw = vcb + C;
    const A *vr = c_rs + n * C, *vh = c1h + n * C, *vl = c1l + n * C, *v2 = c2 + n * C;
    for (int64_t c = 0; c < C; ++c) {
      vca[c] = ca(n, c);
      vcm[c] = cm(n, c);
      vcb[c] = b[c];
      vw[c] = w[c];
    }
    alignas(64) A bx[kBuf<T>], bd[kBuf<T>], bo[kBuf<T>];
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t off = (n * g.HW + s) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t len = std::min(kBlock, C - c0);
        const A* q = ComputeBlock<T, A>::load(x + off + c0, bx, len);
        const A* r = kept ? nullptr : ComputeBlock<T, A>::load(dy + off + c0, bd, len);
        A* o = ComputeBlock<T, A>::out(dx + off + c0, bo);
        for (int64_t j = 0; j < len; j += V::size()) {
          const int64_t cnt = std::min<int64_t>(V::size(), len - j);
          const int64_t c = c0 + j;
          const V xc = V::loadu(q + j, cnt) - V::loadu(vcm + c, cnt);
          const V dz = kept ? V::loadu(kept + (s - lo) * C + c, cnt)
                            : act_grad<A, SILU>(at::vec::fmadd(xc, V::loadu(vca + c, cnt), V::loadu(vcb + c, cnt)),
                                                V::loadu(r + j, cnt));
          const V res = V::loadu(vr + c, cnt) *
                        (at::vec::fmsub(V::loadu(vw + c, cnt), dz, V::loadu(vh + c, cnt)) - V::loadu(vl + c, cnt) -
                         V::loadu(v2 + c, cnt) * xc);
          if (cnt == V::size())
            res.store(o + j);
          else
            res.store(o + j, cnt);
        }
        ComputeBlock<T, A>::store(dx + off + c0, o, len);
      }
    }
  }

  // The dx coefficients of group (n, k) from its channels' sums SA, SB.
  void group_coef(int64_t n, int64_t k) const {
    const double M = static_cast<double>(g.M());
    const double rs = rstd[n * g.G + k];
    double sa = 0, sb = 0;
    for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
      sa += static_cast<double>(w[c]) * SA[n * g.C + c];
      sb += static_cast<double>(w[c]) * SB[n * g.C + c];
    }
    // c1 as a float pair (hi + lo): w dz - c1 then cancels exactly where it should (a group of
    // one element has dx = 0 while rstd = 1/sqrt(eps) amplifies any residue).
    const double c1 = sa / M;
    const A hi = static_cast<A>(c1);
    const A lo = static_cast<A>(c1 - static_cast<double>(hi));
    const A k2 = static_cast<A>(rs * rs * sb / M);
    for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
      const int64_t i = n * g.C + c;
      c_rs[i] = static_cast<A>(rs);
      c1h[i] = hi;
      c1l[i] = lo;
      c2[i] = k2;
    }
  }

  void piece(int64_t t, int64_t& grp, int64_t& lo, int64_t& hi) const {
    grp = t / plan.per;
    lo = (t % plan.per) * plan.len;
    hi = std::min(g.M(), lo + plan.len);
  }

  // Sums of task t: NCHW into out[(channel of the group) * 3 + {0,1,2}] for the D channels of its
  // group; CL into out[c * 3 + ...] for all C channels. keep: dz of the task (fused path).
  void task_sums(int64_t t, double* out, std::vector<A>& acc, std::vector<double>& tmp, A* keep) const {
    if (!g.cl) {
      int64_t grp, lo, hi;
      piece(t, grp, lo, hi);
      const int64_t n = grp / g.G, c0 = (grp % g.G) * g.D;
      for (int64_t d = 0; d < g.D; ++d) out[d * 3] = out[d * 3 + 1] = out[d * 3 + 2] = 0.0;
      for (int64_t i = lo; i < hi;) {
        const int64_t d = i / g.HW, e = std::min(hi, (d + 1) * g.HW);
        const int64_t c = c0 + d;
        const int64_t off = grp * g.M() + i;
        run_sums(x + off, dy + off, e - i, ca(n, c), cm(n, c), b[c], out[d * 3], out[d * 3 + 1], out[d * 3 + 2],
                 keep ? keep + (i - lo) : nullptr);
        i = e;
      }
      return;
    }
    const int64_t n = t / plan.per, lo = (t % plan.per) * plan.len, hi = std::min(g.HW, lo + plan.len);
    tmp.resize(3 * g.C);
    cl_sums(n, lo, hi, acc, tmp.data(), tmp.data() + g.C, tmp.data() + 2 * g.C, keep);
    for (int64_t c = 0; c < g.C; ++c) {
      out[c * 3] = tmp[c];
      out[c * 3 + 1] = tmp[g.C + c];
      out[c * 3 + 2] = tmp[2 * g.C + c];
    }
  }

  void task_dx(int64_t t, std::vector<A>& coef, const A* kept) const {
    if (!g.cl) {
      int64_t grp, lo, hi;
      piece(t, grp, lo, hi);
      const int64_t n = grp / g.G, c0 = (grp % g.G) * g.D;
      for (int64_t i = lo; i < hi;) {
        const int64_t d = i / g.HW, e = std::min(hi, (d + 1) * g.HW);
        const int64_t c = c0 + d, nc = n * g.C + c;
        const int64_t off = grp * g.M() + i;
        run_dx(x + off, dy + off, dx + off, e - i, ca(n, c), cm(n, c), b[c], w[c], c_rs[nc], c1h[nc], c1l[nc],
               c2[nc], kept ? kept + (i - lo) : nullptr);
        i = e;
      }
      return;
    }
    const int64_t n = t / plan.per, lo = (t % plan.per) * plan.len, hi = std::min(g.HW, lo + plan.len);
    cl_dx(n, lo, hi, coef, kept);
  }

  // NCHW, fused: groups [g0, g1), each pass over the whole batch before the next (as the forward's
  // groups_fused), dz of the batch kept in `kept` between the two passes when SILU.
  void groups_fused(int64_t g0, int64_t g1, std::vector<A>& kept) const {
    const int64_t M = g.M(), HW = g.HW, D = g.D;
    if (SILU) kept.resize((g1 - g0) * M);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t n = grp / g.G, c0 = (grp % g.G) * D;
      const double r = rstd[grp], mu = mean[grp];
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = c0 + d, nc = n * g.C + c, off = grp * M + d * HW;
        const A m = static_cast<A>(mu - (shift ? static_cast<double>(shift[nc]) : 0.0));
        double sa = 0, sb = 0, ss = 0;
        run_sums(x + off, dy + off, HW, static_cast<A>(r * static_cast<double>(w[c])), m, b[c], sa, sb, ss,
                 SILU ? kept.data() + (grp - g0) * M + d * HW : nullptr);
        SA[nc] = sa;
        SB[nc] = sb;
        SS[nc] = ss;
      }
    }
    const double inv_M = 1.0 / static_cast<double>(M);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t n = grp / g.G, c0 = (grp % g.G) * D;
      const double r = rstd[grp], mu = mean[grp];
      double sa = 0, sb = 0;
      for (int64_t d = 0; d < D; ++d) {
        sa += static_cast<double>(w[c0 + d]) * SA[n * g.C + c0 + d];
        sb += static_cast<double>(w[c0 + d]) * SB[n * g.C + c0 + d];
      }
      // c1 as a float pair (hi + lo): see group_coef.
      const double c1 = sa * inv_M;
      const A hi = static_cast<A>(c1), lo = static_cast<A>(c1 - static_cast<double>(hi));
      const A k2 = static_cast<A>(r * r * sb * inv_M), rs = static_cast<A>(r);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = c0 + d, nc = n * g.C + c, off = grp * M + d * HW;
        const A m = static_cast<A>(mu - (shift ? static_cast<double>(shift[nc]) : 0.0));
        run_dx(x + off, dy + off, dx + off, HW, static_cast<A>(r * static_cast<double>(w[c])), m, b[c], w[c], rs, hi,
               lo, k2, SILU ? kept.data() + (grp - g0) * M + d * HW : nullptr);
      }
    }
  }

  void run() const {
    if (plan.fused && !g.cl) {
      // Batches of at most 16384 elements: their dz (64 KiB in fp32) stays in L2 between the passes.
      const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(8, kChunk / std::max<int64_t>(g.M(), 1)));
      at::parallel_for(0, plan.tasks, plan.grain, [&](int64_t begin, int64_t end) {
        std::vector<A> kept;
        for (int64_t t = begin; t < end; t += batch) groups_fused(t, std::min(end, t + batch), kept);
      });
      return;
    }
    const int64_t slots = g.cl ? g.C : g.D;  // channels a task reports sums for
    // Store the task's per-channel sums into SA/SB/SS (NCHW: the D channels of its group).
    auto store = [&](int64_t t, const double* s) {
      const int64_t base = g.cl ? (t / plan.per) * g.C : (t / plan.per) * g.D;  // = n C (CL) or n C + k D (NCHW)
      for (int64_t j = 0; j < slots; ++j) {
        SA[base + j] = s[j * 3];
        SB[base + j] = s[j * 3 + 1];
        SS[base + j] = s[j * 3 + 2];
      }
    };
    if (plan.fused) {
      const bool keep = SILU;  // without the activation dz is dy itself: nothing to keep
      const int64_t task_elems = g.cl ? g.HW * g.C : g.M();
      at::parallel_for(0, plan.tasks, plan.grain, [&](int64_t begin, int64_t end) {
        std::vector<A> acc, coef, kept(keep ? task_elems : 0);
        std::vector<double> s(3 * slots), tmp;
        for (int64_t t = begin; t < end; ++t) {
          task_sums(t, s.data(), acc, tmp, keep ? kept.data() : nullptr);
          store(t, s.data());
          if (g.cl) {
            for (int64_t k = 0; k < g.G; ++k) group_coef(t, k);
          } else {
            group_coef(t / g.G, t % g.G);
          }
          task_dx(t, coef, keep ? kept.data() : nullptr);
        }
      });
      return;
    }
    const int64_t T_ = plan.tasks;
    std::vector<double> part(T_ * slots * 3);
    at::parallel_for(0, T_, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> acc;
      std::vector<double> tmp;
      for (int64_t t = begin; t < end; ++t) task_sums(t, part.data() + t * slots * 3, acc, tmp, nullptr);
    });
    // Combine each unit's partials in task order (a unit: a group for NCHW, a sample for CL).
    const int64_t units = T_ / plan.per;
    for (int64_t u = 0; u < units; ++u) {
      std::vector<double> s(3 * slots, 0.0);
      for (int64_t j = 0; j < plan.per; ++j) {
        const double* p = part.data() + (u * plan.per + j) * slots * 3;
        for (int64_t q = 0; q < 3 * slots; ++q) s[q] += p[q];
      }
      store(u * plan.per, s.data());
    }
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t k = 0; k < g.G; ++k) group_coef(n, k);
    at::parallel_for(0, T_, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> coef;
      for (int64_t t = begin; t < end; ++t) task_dx(t, coef, nullptr);
    });
  }
};

at::Tensor match_layout(const at::Tensor& t, bool cl) {
  if (!cl) return t.contiguous();
  if (is_channels_last_dense(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& shift,
    const at::Tensor& mean_t, const at::Tensor& rstd_t, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  check_group_norm_silu_bwd_args(grad_y, x_in, shift, mean_t, rstd_t, weight, bias, num_groups, at::kCPU,
                                 /*allow_double=*/true);
  bool cl = false;
  const at::Tensor x = dense_layout(x_in, cl);
  const at::Tensor dy = match_layout(grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type()), cl);
  const Geometry g = geometry(x, num_groups, cl);
  at::Tensor dx = at::empty_like(x);
  const int64_t NG = g.N * g.G, NC = g.N * g.C;
  std::vector<double> mean(NG), rstd(NG);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean_t.scalar_type(), "group_norm_silu_stats", [&] {
    for (int64_t i = 0; i < NG; ++i) {
      mean[i] = static_cast<double>(mean_t.const_data_ptr<scalar_t>()[(i / g.G) * mean_t.stride(0) + (i % g.G) * mean_t.stride(1)]);
      rstd[i] = static_cast<double>(rstd_t.const_data_ptr<scalar_t>()[(i / g.G) * rstd_t.stride(0) + (i % g.G) * rstd_t.stride(1)]);
    }
  });
  // Per-(n, c) sums, written by the workers: allocated uninitialised (a main thread that zeroed
  // them would own their cache lines, and every worker write would first fetch one from its core).
  std::unique_ptr<double[]> SA(new double[NC]), SB(new double[NC]), SS(new double[NC]);
  const bool want_s = defined(shift);
  if (g.M() == 0 || g.N == 0) {
    std::fill_n(SA.get(), NC, 0.0);
    std::fill_n(SB.get(), NC, 0.0);
    std::fill_n(SS.get(), NC, 0.0);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cpu", [&] {
      using A = opmath_t<scalar_t>;
      std::vector<A> w, b, sh;
      std::unique_ptr<A[]> c_rs(new A[NC]), c1h(new A[NC]), c1l(new A[NC]), c2(new A[NC]);
      read_param<A>(weight, g.C, A(1), w);
      read_param<A>(bias, g.C, A(0), b);
      if (want_s) read_shift<A>(shift, g.N, g.C, sh);
      auto go = [&](auto silu_tag) {
        constexpr bool S = decltype(silu_tag)::value;
        Backward<scalar_t, S>{x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                              g, make_plan(g), want_s, mean.data(), rstd.data(), w.data(), b.data(),
                              want_s ? sh.data() : nullptr, SA.get(), SB.get(), SS.get(), c_rs.get(), c1h.get(),
                              c1l.get(), c2.get()}
            .run();
      };
      if (silu)
        go(std::true_type{});
      else
        go(std::false_type{});
    });
  }
  // dbias = sum_n A, dweight = sum_n B rstd; dshift[n, c] = sum over positions of dx
  //       = rstd (w A - HW c1 - c2 S) with c1 = sum_g(w A) / M, c2 = rstd^2 sum_g(w B) / M.
  auto param_grad = [&](const std::optional<at::Tensor>& p, bool is_w) {
    if (!defined(p)) return at::empty({0}, x.options());
    std::vector<double> v(g.C, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t k = 0; k < g.G; ++k) {
        const double r = rstd[n * g.G + k];
        for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c)
          v[c] += is_w ? SB[n * g.C + c] * r : SA[n * g.C + c];
      }
    at::Tensor t = at::empty({g.C}, p->options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "param_grad", [&] {
      scalar_t* d = t.data_ptr<scalar_t>();
      for (int64_t c = 0; c < g.C; ++c) d[c] = static_cast<scalar_t>(v[c]);
    });
    return t;
  };
  at::Tensor dshift = at::empty({0}, x.options());
  if (want_s) {
    std::vector<double> w(g.C, 1.0);
    if (defined(weight)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight->scalar_type(), "w", [&] {
        for (int64_t c = 0; c < g.C; ++c)
          w[c] = static_cast<double>(weight->const_data_ptr<scalar_t>()[c * weight->stride(0)]);
      });
    }
    dshift = at::empty({g.N, g.C}, shift->options().memory_format(at::MemoryFormat::Contiguous));
    const double M = static_cast<double>(g.M()), HW = static_cast<double>(g.HW);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dshift.scalar_type(), "dshift", [&] {
      scalar_t* d = dshift.data_ptr<scalar_t>();
      for (int64_t n = 0; n < g.N; ++n)
        for (int64_t k = 0; k < g.G; ++k) {
          const double rs = rstd[n * g.G + k];
          double sa = 0, sb = 0;
          for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
            sa += w[c] * SA[n * g.C + c];
            sb += w[c] * SB[n * g.C + c];
          }
          const double c1 = M > 0 ? sa / M : 0.0, c2 = M > 0 ? rs * rs * sb / M : 0.0;
          for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
            const int64_t i = n * g.C + c;
            d[i] = static_cast<scalar_t>(rs * (w[c] * SA[i] - HW * c1 - c2 * SS[i]));
          }
        }
    });
  }
  // dx in x_in's layout (dense_layout copied odd strides to NCHW; dx stays NCHW then).
  return {dx, param_grad(weight, true), param_grad(bias, false), dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_fwd", &group_norm_silu_fwd_cpu);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cpu);
}

}  // namespace fastddpm
