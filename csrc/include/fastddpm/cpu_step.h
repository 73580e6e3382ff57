// The block view shared by the CPU reverse-step kernels (ddpm_step, ddim_step, dpmpp_step).
#pragma once

#include <cstdint>

#include "fastddpm/cpu_vec.h"
#include "fastddpm/elementwise.h"
#include "fastddpm/philox_cpu.h"

namespace fastddpm {

// One block [i, i + n) of a reverse-step kernel (ddpm_step, ddim_step, dpmpp_step) as float arrays: x_t and the
// model output to read (px, pm), x_prev and the predicted x0 to write (po, px0; x0 into a scratch buffer when
// the op does not return it), in place for float32 and through local buffers otherwise; noise() gives the
// block's z in bz (an op without noise may load another operand there); finish() writes the buffers back.
template <typename scalar_t>
struct StepBlock {
  using Block = FloatBlock<scalar_t>;
  alignas(64) float bx[kBlock], bm[kBlock], bz[kBlock], bo[kBlock], b0[kBlock];
  int64_t i, n;
  scalar_t* out;
  scalar_t* pred;
  const float* px;
  const float* pm;
  float* px0;
  float* po;

  StepBlock(const scalar_t* x, const scalar_t* m, scalar_t* out_, scalar_t* pred_, int64_t i_, int64_t n_)
      : i(i_), n(n_), out(out_), pred(pred_) {
    px = Block::load(x + i, bx, n);
    pm = Block::load(m + i, bm, n);
    px0 = pred != nullptr ? Block::out(pred + i, b0) : b0;
    po = Block::out(out + i, bo);
  }
  StepBlock(const StepBlock&) = delete;

  // z of the block: the noise tensor's (kNoiseTensor), else Philox normals of counters offset + i onwards.
  const float* noise(const scalar_t* z, int64_t noise_mode, uint64_t seed, uint64_t offset) {
    if (noise_mode == kNoiseTensor) return Block::load(z + i, bz, n);
    philox_normal_block(seed, offset + static_cast<uint64_t>(i), n, bz);
    return bz;
  }

  void finish() const {
    if (pred != nullptr) Block::store(pred + i, px0, n);
    Block::store(out + i, po, n);
  }
};

}  // namespace fastddpm
