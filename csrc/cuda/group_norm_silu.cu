// GroupNorm (+ SiLU) on CUDA, forward and backward. Torch-free (see group_norm_silu_cuda.cpp).
//
// Two stages each way, deterministic (every sum has a fixed order; no float atomics):
//   forward  1. partial shifted sums (x - K, K = the mean of 64 values of the group) per (n, g, slice of the
//               spatial positions): at least four blocks per SM even at batch 1
//               (group_norm_split.h);
//            2. one thread per (n, g) combines its slices in order -> mean, rstd (fp32);
//            3. y = silu((x - mean) rstd w + b), 16 bytes per thread per step (float4 / 8 halves).
//   backward 1. partial sums of dz and dz xhat per (n, c, slice), z recomputed from x;
//            2. per (n, g): c1 = sum w A / M, c2 = rstd sum w B / M; per c: dweight, dbias;
//            3. dx = rstd (w dz - c1 - c2 (x - mean)), vectorised like the forward.
// x is NCHW-contiguous (CL = false) or channels_last, i.e. (N, HW, C) dense (CL = true).
#include <atomic>

#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"
#include "fastddpm/group_norm_split.h"

namespace fastddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Geo {
  int64_t N, C, G, D, HW, split, s_per;
  bool cl;
  __host__ __device__ int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return cl ? (n * HW + s) * C + c : (n * C + c) * HW + s;
  }
  __host__ __device__ void chan_group(int64_t i, int64_t& c, int64_t& ng) const {
    int64_t n;
    if (cl) {
      c = i % C;
      n = i / (HW * C);
    } else {
      c = (i / HW) % C;
      n = i / (C * HW);
    }
    ng = n * G + c / D;
  }
};

// Sum over the block (deterministic: fixed shuffle tree, then warp 0 over the warp sums).
__device__ __forceinline__ float block_sum(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? sh[lane] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

// The block's sums of a and b, written by thread 0 to this block's slot of the partial-sum arrays (b times
// b_scale): the end of both partial-sum kernels.
__device__ __forceinline__ void store_block_sums(float a, float b, float* sh, float* pa, float* pb,
                                                 float b_scale = 1.f) {
  a = block_sum(a, sh);
  b = block_sum(b, sh);
  if (threadIdx.x == 0) {
    pa[blockIdx.x] = a;
    pb[blockIdx.x] = b * b_scale;
  }
}

// The shift K of the sums: the mean of (up to) the first 64 positions of the group's first channel
// (the variance's rounding error grows with ((mean - K) / sigma)^2, and a single element could be
// an outlier). Both statistics kernels compute it in the same order, so they agree on K.
template <typename T>
__device__ __forceinline__ float shift_of(const T* __restrict__ x, const Geo& g, int64_t n, int64_t c0) {
  const int64_t k = g.HW < 64 ? g.HW : 64;
  float s = 0.f;
  for (int64_t i = 0; i < k; ++i) s += to_float(x[g.offset(n, c0, i)]);
  return k > 0 ? s / static_cast<float>(k) : 0.f;
}

template <typename T>
__global__ void stats_partial_kernel(const T* __restrict__ x, float* __restrict__ p1, float* __restrict__ p2,
                                     Geo g) {
  __shared__ float sh[32];
  const int64_t ng = blockIdx.x / g.split, sp = blockIdx.x % g.split;
  const int64_t n = ng / g.G, c0 = (ng % g.G) * g.D;
  const float K = shift_of(x, g, n, c0);
  const int64_t s0 = sp * g.s_per;
  const int64_t s1 = s0 + g.s_per < g.HW ? s0 + g.s_per : g.HW;
  const int64_t len = s1 > s0 ? (s1 - s0) * g.D : 0;
  float a1 = 0.f, a2 = 0.f;
  for (int64_t e = threadIdx.x; e < len; e += blockDim.x) {
    // Consecutive threads walk the contiguous axis: s for NCHW, the channel for channels_last.
    int64_t c, s;
    if (g.cl) {
      s = s0 + e / g.D;
      c = c0 + e % g.D;
    } else {
      c = c0 + e / (s1 - s0);
      s = s0 + e % (s1 - s0);
    }
    const float v = to_float(x[g.offset(n, c, s)]) - K;
    a1 += v;
    a2 = fmaf(v, v, a2);
  }
  store_block_sums(a1, a2, sh, p1, p2);
}

template <typename T>
__global__ void stats_final_kernel(const T* __restrict__ x, const float* __restrict__ p1,
                                   const float* __restrict__ p2, float* __restrict__ mean,
                                   float* __restrict__ rstd, Geo g, float eps) {
  const int64_t ng = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ng >= g.N * g.G) return;
  const int64_t n = ng / g.G, c0 = (ng % g.G) * g.D;
  const float K = shift_of(x, g, n, c0);
  double s1 = 0, s2 = 0;  // a handful of partials: double costs nothing here
  for (int64_t i = 0; i < g.split; ++i) {
    s1 += p1[ng * g.split + i];
    s2 += p2[ng * g.split + i];
  }
  const double M = static_cast<double>(g.D * g.HW);
  const double m1 = s1 / M;
  double var = s2 / M - m1 * m1;
  var = var > 0 ? var : 0;
  mean[ng] = static_cast<float>(K + m1);
  rstd[ng] = static_cast<float>(rsqrt(var + eps));
}

// 16 bytes of T.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T, bool SILU>
__global__ void fwd_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, const float* __restrict__ w,
                                 const float* __restrict__ b, Geo g, int64_t total, bool vec) {
  constexpr int V = Pack<T>::kN;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  auto f = [&](int64_t i, float xv) {
    int64_t c, ng;
    g.chan_group(i, c, ng);
    float z = (xv - mean[ng]) * rstd[ng] * (w ? __ldg(w + c) : 1.f) + (b ? __ldg(b + c) : 0.f);
    if (SILU) z = silu(z);
    return z;
  };
  if (vec) {
    const int64_t packs = total / V;
    for (int64_t p = first; p < packs; p += stride) {
      const Pack<T> in = reinterpret_cast<const Pack<T>*>(x)[p];
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = from_float<T>(f(p * V + k, to_float(in.v[k])));
      reinterpret_cast<Pack<T>*>(y)[p] = out;
    }
  } else {
    for (int64_t i = first; i < total; i += stride) y[i] = from_float<T>(f(i, to_float(x[i])));
  }
}

template <typename T, bool SILU>
__device__ __forceinline__ float dz_of(float xc, float dy, float a, float b) {
  if (!SILU) return dy;
  return silu_backward(fmaf(xc, a, b), dy);
}

template <typename T, bool SILU>
__global__ void bwd_partial_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   const float* __restrict__ w, const float* __restrict__ b,
                                   float* __restrict__ pa, float* __restrict__ pb, Geo g) {
  __shared__ float sh[32];
  // Block (n, c, slice): partial sum over the slice's spatial positions.
  const int64_t nc = blockIdx.x / g.split, sp = blockIdx.x % g.split;
  const int64_t n = nc / g.C, c = nc % g.C, ng = n * g.G + c / g.D;
  const float m = mean[ng], rs = rstd[ng];
  const float a = rs * (w ? w[c] : 1.f), bb = b ? b[c] : 0.f;
  const int64_t s0 = sp * g.s_per;
  const int64_t s1 = s0 + g.s_per < g.HW ? s0 + g.s_per : g.HW;
  float sa = 0.f, sb = 0.f;
  for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
    const int64_t o = g.offset(n, c, s);
    const float xc = to_float(x[o]) - m;
    const float dz = dz_of<T, SILU>(xc, to_float(dy[o]), a, bb);
    sa += dz;
    sb = fmaf(dz, xc, sb);
  }
  store_block_sums(sa, sb, sh, pa, pb, rs);
}

// Per (n, g) coefficients (threads [0, N G)) and per-channel parameter gradients (threads
// [N G, N G + C)), each a sum in a fixed order.
__global__ void bwd_coef_kernel(const float* __restrict__ pa, const float* __restrict__ pb,
                                const float* __restrict__ rstd, const float* __restrict__ w,
                                float* __restrict__ c1, float* __restrict__ c2, float* __restrict__ dw,
                                float* __restrict__ db, Geo g) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t NG = g.N * g.G;
  if (t < NG) {
    const int64_t n = t / g.G, k = t % g.G;
    double sa = 0, sb = 0;
    for (int64_t c = k * g.D; c < (k + 1) * g.D; ++c) {
      double ra = 0, rb = 0;
      for (int64_t i = 0; i < g.split; ++i) {
        ra += pa[(n * g.C + c) * g.split + i];
        rb += pb[(n * g.C + c) * g.split + i];
      }
      const double wc = w ? w[c] : 1.0;
      sa += wc * ra;
      sb += wc * rb;
    }
    const double M = static_cast<double>(g.D * g.HW);
    c1[t] = static_cast<float>(sa / M);
    c2[t] = static_cast<float>(rstd[t] * sb / M);
  } else if (t < NG + g.C) {
    const int64_t c = t - NG;
    double ra = 0, rb = 0;
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t i = 0; i < g.split; ++i) {
        ra += pa[(n * g.C + c) * g.split + i];
        rb += pb[(n * g.C + c) * g.split + i];
      }
    db[c] = static_cast<float>(ra);
    dw[c] = static_cast<float>(rb);
  }
}

template <typename T, bool SILU>
__global__ void bwd_apply_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 const float* __restrict__ w, const float* __restrict__ b,
                                 const float* __restrict__ c1, const float* __restrict__ c2, Geo g,
                                 int64_t total, bool vec) {
  constexpr int V = Pack<T>::kN;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  auto f = [&](int64_t i, float xv, float dv) {
    int64_t c, ng;
    g.chan_group(i, c, ng);
    const float rs = rstd[ng], wc = w ? __ldg(w + c) : 1.f;
    const float xc = xv - mean[ng];
    const float dz = dz_of<T, SILU>(xc, dv, rs * wc, b ? __ldg(b + c) : 0.f);
    return rs * (wc * dz - c1[ng] - c2[ng] * xc);
  };
  if (vec) {
    const int64_t packs = total / V;
    for (int64_t p = first; p < packs; p += stride) {
      const Pack<T> xin = reinterpret_cast<const Pack<T>*>(x)[p];
      const Pack<T> din = reinterpret_cast<const Pack<T>*>(dy)[p];
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = from_float<T>(f(p * V + k, to_float(xin.v[k]), to_float(din.v[k])));
      reinterpret_cast<Pack<T>*>(dx)[p] = out;
    }
  } else {
    for (int64_t i = first; i < total; i += stride) dx[i] = from_float<T>(f(i, to_float(x[i]), to_float(dy[i])));
  }
}

Geo make_geo(const GroupNormSiluShape& s) {
  Geo g;
  g.N = s.N;
  g.C = s.C;
  g.G = s.G;
  g.D = s.C / s.G;
  g.HW = s.HW;
  g.cl = s.cl;
  g.split = s.split;
  g.s_per = s.s_per;
  return g;
}

template <typename T>
bool aligned16(const void* p, int64_t total) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (total % Pack<T>::kN == 0);
}

}  // namespace

// Caches each device's SM count (cudaDeviceGetAttribute is a per-call cost).
void group_norm_silu_split(int64_t HW, int64_t per_row, int64_t rows, int64_t* split, int64_t* s_per) {
  static std::atomic<int> cached[64];  // SMs per device (zero-initialised: static storage)
  int dev = 0, sms = 0;
  const bool known = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64;
  if (known) sms = cached[dev].load(std::memory_order_relaxed);
  if (sms <= 0) {
    // The count sets the slicing, so the summation order: results are deterministic on a given
    // GPU, and may differ in the last bits between GPUs with other SM counts.
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
      sms = 132;  // an H100's count
    else if (known)
      cached[dev].store(sms, std::memory_order_relaxed);
  }
  group_norm_split(HW, per_row, rows, 4 * static_cast<int64_t>(sms), split, s_per);
}

int launch_group_norm_silu_fwd(const GroupNormSiluFwdParams& p, cudaStream_t stream) {
  const Geo g = make_geo(p.shape);
  const int64_t N = g.N, C = g.C, G = g.G, split = g.split;
  const int64_t total = N * C * g.HW;
  if (N * G == 0 || total == 0) return 0;
  FASTDDPM_CUDA_DISPATCH(p.dtype, {
    const scalar_t* xp = static_cast<const scalar_t*>(p.x);
    scalar_t* yp = static_cast<scalar_t*>(p.y);
    stats_partial_kernel<scalar_t><<<static_cast<unsigned>(N * G * split), kThreads, 0, stream>>>(xp, p.p1, p.p2,
                                                                                                  g);
    FASTDDPM_RETURN_IF_LAUNCH_FAILED();
    stats_final_kernel<scalar_t><<<static_cast<unsigned>((N * G + 127) / 128), 128, 0, stream>>>(
        xp, p.p1, p.p2, p.mean, p.rstd, g, p.eps);
    FASTDDPM_RETURN_IF_LAUNCH_FAILED();
    const bool vec = aligned16<scalar_t>(p.x, total) && aligned16<scalar_t>(p.y, total);
    const int blocks = grid_for(vec ? total / Pack<scalar_t>::kN : total, kThreads, 1);
    if (p.shape.silu)
      fwd_apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(xp, yp, p.mean, p.rstd, p.w, p.b, g, total,
                                                                        vec);
    else
      fwd_apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(xp, yp, p.mean, p.rstd, p.w, p.b, g, total,
                                                                         vec);
  });
  return static_cast<int>(cudaGetLastError());
}

int launch_group_norm_silu_bwd(const GroupNormSiluBwdParams& p, cudaStream_t stream) {
  const Geo g = make_geo(p.shape);
  const int64_t N = g.N, C = g.C, G = g.G, split = g.split;
  const int64_t total = N * C * g.HW;
  if (N * C == 0) return 0;
  FASTDDPM_CUDA_DISPATCH(p.dtype, {
    const scalar_t* xp = static_cast<const scalar_t*>(p.x);
    const scalar_t* dyp = static_cast<const scalar_t*>(p.dy);
    scalar_t* dxp = static_cast<scalar_t*>(p.dx);
    const unsigned pblocks = static_cast<unsigned>(N * C * split);
    if (p.shape.silu)
      bwd_partial_kernel<scalar_t, true><<<pblocks, kThreads, 0, stream>>>(xp, dyp, p.mean, p.rstd, p.w, p.b, p.pa,
                                                                            p.pb, g);
    else
      bwd_partial_kernel<scalar_t, false><<<pblocks, kThreads, 0, stream>>>(xp, dyp, p.mean, p.rstd, p.w, p.b, p.pa,
                                                                             p.pb, g);
    FASTDDPM_RETURN_IF_LAUNCH_FAILED();
    const int64_t ct = N * G + C;
    bwd_coef_kernel<<<static_cast<unsigned>((ct + 127) / 128), 128, 0, stream>>>(p.pa, p.pb, p.rstd, p.w, p.c1, p.c2,
                                                                                  p.dw, p.db, g);
    FASTDDPM_RETURN_IF_LAUNCH_FAILED();
    if (total > 0) {
      const bool vec = aligned16<scalar_t>(p.x, total) && aligned16<scalar_t>(p.dy, total) &&
                       aligned16<scalar_t>(p.dx, total);
      const int blocks = grid_for(vec ? total / Pack<scalar_t>::kN : total, kThreads, 1);
      if (p.shape.silu)
        bwd_apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(xp, dyp, dxp, p.mean, p.rstd, p.w, p.b,
                                                                          p.c1, p.c2, g, total, vec);
      else
        bwd_apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(xp, dyp, dxp, p.mean, p.rstd, p.w, p.b,
                                                                           p.c1, p.c2, g, total, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
