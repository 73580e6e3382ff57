// How the CUDA GroupNorm kernels slice their reductions (torch-free, host code; unit-tested by
// csrc/tests/test_elementwise.cpp, which runs where no GPU exists).
#pragma once

#include <cstdint>

namespace fastddpm {

// Each of `rows` rows ((n, group) forward, (n, channel) backward) reduces `per_row` channels over
// HW positions. Its positions are cut into `split` slices of `s_per` positions, one block each:
// about kTarget elements a block, and at least `min_blocks` blocks in all (a few per SM), so that
// a batch of one fills a large GPU, while no slice holds fewer than kMinSlice elements unless the
// whole row does. Slices cover [0, HW) exactly: (split - 1) * s_per < HW <= split * s_per.
inline void group_norm_split(int64_t HW, int64_t per_row, int64_t rows, int64_t min_blocks, int64_t* split,
                             int64_t* s_per) {
  constexpr int64_t kTarget = 4096, kMinSlice = 256;
  if (HW <= 0) {
    *split = 1;
    *s_per = 1;
    return;
  }
  const int64_t elems = HW * (per_row > 0 ? per_row : 1);
  int64_t sp = (elems + kTarget - 1) / kTarget;
  if (rows > 0) {
    const int64_t fill = (min_blocks + rows - 1) / rows;
    if (fill > sp) sp = fill;
  }
  const int64_t most = elems / kMinSlice;  // >= ceil(elems / kTarget) whenever elems >= kMinSlice
  if (sp > most) sp = most;
  if (sp > HW) sp = HW;
  if (sp < 1) sp = 1;
  *s_per = (HW + sp - 1) / sp;
  *split = (HW + *s_per - 1) / *s_per;
}

}  // namespace fastddpm
