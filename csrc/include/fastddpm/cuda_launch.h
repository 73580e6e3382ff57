// Launchers of the CUDA kernels, all of them: plain C++ declarations shared by the torch-free .cu files
// (which define them) and the *_cuda.cpp files (which call them after checking arguments). Each takes
// its arguments in one struct, named fields rather than a long positional list that a caller could
// silently misorder, and returns the cudaError_t of its launches as an int (0: success).
//
// Conventions of every elementwise launch (q_sample, ddpm_step, ddim_step, dpmpp_step): tensors are
// batch-major dense, sample b the run [b*M, (b+1)*M) of each; t, prev_t, last_t hold one int64
// timestep per sample and index tables of length T (clamped into them on the device); a null output
// pointer (v, pred) means that output is not written.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace fastddpm {
namespace cuda {

// Element types, as the host passes them (cuda_host.h's cuda_dtype reads them off a tensor).
enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct QSampleParams {
  DType dtype;
  const void* x0;
  const void* eps;
  void* xt;
  void* v;  // null: v not written
  const int64_t* t;
  const float* sqrt_ab;    // sqrt(abar), T values
  const float* sqrt_1mab;  // sqrt(1 - abar), T values
  int64_t T, B, M;
};
int launch_q_sample(const QSampleParams& p, cudaStream_t stream);

// The Philox stream of ddpm_step/ddim_step's in-kernel noise (noise_mode kNoisePhilox): element i gets
// normal(seed, offset + *offset_ptr + i); offset_ptr, where not null, points to a device int64 read
// by the kernel (no host sync), so a CUDA graph replays the step with a new offset. The registrations
// (*_cuda.cpp) leave offset_ptr null for every other noise mode, so only in-kernel noise reads it.
struct PhiloxStream {
  uint64_t seed, offset;
  const int64_t* offset_ptr;
};

// What every reverse step (ddpm_step, ddim_step, dpmpp_step) reads and writes.
struct StepOperands {
  DType dtype;
  const void* x;  // sample x_t
  const void* m;  // model_output
  void* out;      // prev_sample
  void* pred;     // the (clipped) x0 prediction, or null
  const int64_t* t;
  const int64_t* prev_t;
  const float* alphas_cumprod;  // T values
  int64_t T, B, M;
};

struct DdpmStepParams {
  StepOperands s;
  const void* z;   // the noise tensor (noise_mode kNoiseTensor), else null
  const void* pv;  // predicted_variance (learned variance types), else null
  PhiloxStream philox;
  int64_t noise_mode, prediction_type, variance_type;  // codes of elementwise.h
  float clip_range;                                    // <= 0: no clipping
  bool diffusers_beta;
};
int launch_ddpm_step(const DdpmStepParams& p, cudaStream_t stream);

struct DdimStepParams {
  StepOperands s;
  const void* z;              // the noise tensor (noise_mode kNoiseTensor), else null
  float final_alpha_cumprod;  // abar_prev where prev_t < 0
  PhiloxStream philox;
  int64_t noise_mode, prediction_type;  // codes of elementwise.h; kNoNoise where eta == 0
  float eta, clip_range;
  bool use_clipped_model_output, diffusers_beta;
};
int launch_ddim_step(const DdimStepParams& p, cudaStream_t stream);

struct DpmppStepParams {
  StepOperands s;
  const void* p;          // prev_x0, null for the first-order update
  const int64_t* last_t;  // null for the first-order update
  int64_t prediction_type;
  float clip_range;
};
int launch_dpmpp_step(const DpmppStepParams& a, cudaStream_t stream);

int launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, cudaStream_t stream);

// GroupNorm (+ SiLU) over x (N, C, HW) in NCHW-contiguous (cl false) or channels_last (cl true) order.
// split, s_per: the spatial slices of each reduction, from group_norm_silu_split (on the current device).
struct GroupNormSiluShape {
  int64_t N, C, G, HW;
  bool cl, silu;
  int64_t split, s_per;
};

struct GroupNormSiluFwdParams {
  DType dtype;
  const void* x;
  void* y;
  float* mean;  // (N, G)
  float* rstd;  // (N, G)
  const float* w;  // (C,) or null
  const float* b;  // (C,) or null
  float* p1;       // workspace, N * G * split
  float* p2;       // workspace, N * G * split
  GroupNormSiluShape shape;
  float eps;
};
int launch_group_norm_silu_fwd(const GroupNormSiluFwdParams& p, cudaStream_t stream);

struct GroupNormSiluBwdParams {
  DType dtype;
  const void* dy;
  const void* x;
  void* dx;
  const float* mean;  // (N, G)
  const float* rstd;  // (N, G)
  const float* w;     // (C,) or null
  const float* b;     // (C,) or null
  float* pa;          // workspace, N * C * split
  float* pb;          // workspace, N * C * split
  float* c1;          // workspace, N * G
  float* c2;          // workspace, N * G
  float* dw;          // (C,)
  float* db;          // (C,)
  GroupNormSiluShape shape;
};
int launch_group_norm_silu_bwd(const GroupNormSiluBwdParams& p, cudaStream_t stream);

// The spatial slices per (n, g) (forward, per_row = D) or (n, c) (backward, per_row = 1) for the
// current device: at least four blocks per SM in all (group_norm_split.h).
void group_norm_silu_split(int64_t HW, int64_t per_row, int64_t rows, int64_t* split, int64_t* s_per);

}  // namespace cuda
}  // namespace fastddpm
