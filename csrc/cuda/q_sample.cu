// q_sample on CUDA: a grid-stride loop, per-sample coefficients gathered from
// the schedule tables on the device (no host synchronisation). Torch-free.
#include "fastddpm/cuda_launch.h"
#include "fastddpm/cuda_utils.cuh"
#include "fastddpm/elementwise.h"

namespace fastddpm {
namespace cuda {
namespace {

template <typename T>
__global__ void q_sample_kernel(const T* __restrict__ x0, const T* __restrict__ eps, T* __restrict__ xt,
                                T* __restrict__ v, const int64_t* __restrict__ t,
                                const float* __restrict__ sab, const float* __restrict__ s1mab, int64_t T_,
                                int64_t n, int64_t M) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    int64_t ti = t[i / M];
    ti = ti < 0 ? 0 : (ti >= T_ ? T_ - 1 : ti);  // never read outside the table
    const float a = __ldg(sab + ti), s = __ldg(s1mab + ti);
    const float x = to_float(x0[i]), e = to_float(eps[i]);
    xt[i] = from_float<T>(q_sample_xt(x, e, a, s));
    if (v != nullptr) v[i] = from_float<T>(q_sample_v(x, e, a, s));
  }
}

}  // namespace

int launch_q_sample(const QSampleParams& p, cudaStream_t stream) {
  const int64_t n = p.B * p.M;
  if (n == 0) return 0;
  FASTDDPM_CUDA_DISPATCH(
      p.dtype, q_sample_kernel<scalar_t><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      static_cast<const scalar_t*>(p.x0), static_cast<const scalar_t*>(p.eps), static_cast<scalar_t*>(p.xt),
      static_cast<scalar_t*>(p.v), p.t, p.sqrt_ab, p.sqrt_1mab, p.T, n, p.M));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastddpm
