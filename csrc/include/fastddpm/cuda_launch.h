// Launchers of the CUDA kernels: plain C++ declarations shared by the torch-free
// .cu files (which define them) and the *_cuda.cpp files (which call them after
// checking arguments). Return the cudaError_t of the launch as an int.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace fastddpm {
namespace cuda {

// dtype: 0 float, 1 half, 2 bfloat16. Tensors are batch-major dense: sample b is
// the run [b*M, (b+1)*M). t indexes tables of length T (clamped on the device). offset_ptr, where not
// null, points to a device int64 added to the Philox offset inside the kernel (CUDA-graph replays).
int launch_q_sample(int dtype, const void* x0, const void* eps, void* xt, void* v, const int64_t* t,
                    const float* sqrt_ab, const float* sqrt_1mab, int64_t T, int64_t B, int64_t M,
                    cudaStream_t stream);

int launch_ddpm_step(int dtype, const void* x, const void* m, const void* z, const void* pv, void* out,
                     void* pred, const int64_t* t, const int64_t* prev_t, const float* alphas_cumprod,
                     int64_t T, int64_t B, int64_t M, uint64_t seed, uint64_t offset, const int64_t* offset_ptr,
                     int64_t noise_mode, int64_t prediction_type, int64_t variance_type, float clip_range,
                     bool diffusers_beta, cudaStream_t stream);

int launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastddpm
