"""ddpm_step in Triton: the same per-element math as csrc/include/fastddpm/elementwise.h.

Coefficients are computed per element from the gathered abar values (cheap next
to the memory traffic); in-kernel noise is tl.randn(seed, offset + i), whose
Philox4x32-10 conventions the C++ and CUDA kernels reproduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import (
    BLOCK,
    FIXED_LARGE,
    LEARNED,
    LEARNED_RANGE,
    NO_NOISE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    Layout,
    elements,
    launch_device,
    pred_x0,
    step_beta,
    step_elements,
    step_noise,
)


@triton.jit
def _ddpm_step_kernel(x_ptr, m_ptr, z_ptr, pv_ptr, out_ptr, pred_ptr, t_ptr, pt_ptr, ac_ptr, off_ptr,
                      T, n, M, seed, offset, clip_range,
                      NOISE_MODE: tl.constexpr, PRED_TYPE: tl.constexpr, VAR_TYPE: tl.constexpr,
                      CLIP: tl.constexpr, RETURN_PRED: tl.constexpr, OFFSET_PTR: tl.constexpr,
                      DIFFUSERS_BETA: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, tt, pt, ab_t, ab_prev, x, m = step_elements(x_ptr, m_ptr, t_ptr, pt_ptr, ac_ptr, T, n, M, 1.0, BLOCK)
    beta_prod_t = 1.0 - ab_t
    beta_prod_prev = 1.0 - ab_prev
    cur_alpha = ab_t / ab_prev
    cur_beta = step_beta(ab_t, ab_prev, DIFFUSERS_BETA)
    sqrt_ab = tl.sqrt(ab_t)
    sqrt_1mab = tl.sqrt(beta_prod_t)
    # 2-3. predicted x0 (Ho et al. eq. 15), clipped
    x0 = pred_x0(x, m, sqrt_ab, sqrt_1mab, clip_range, PRED_TYPE, CLIP)
    if RETURN_PRED:
        tl.store(pred_ptr + offs, x0.to(pred_ptr.dtype.element_ty), mask=mask)
    # 4-5. posterior mean (eq. 7)
    c_x0 = tl.sqrt(ab_prev) * cur_beta / beta_prod_t
    c_xt = tl.sqrt(cur_alpha) * beta_prod_prev / beta_prod_t
    out = c_x0 * x0 + c_xt * x
    # 6. sigma_t z where t > 0
    if NOISE_MODE != NO_NOISE:
        z = step_noise(z_ptr, off_ptr, offs, mask, seed, offset, NOISE_MODE, OFFSET_PTR)
        var = tl.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
        if VAR_TYPE == FIXED_LARGE:
            sigma = tl.sqrt(cur_beta)
        elif VAR_TYPE == LEARNED:
            sigma = tl.sqrt(tl.load(pv_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        elif VAR_TYPE == LEARNED_RANGE:
            frac = 0.5 * (tl.load(pv_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1.0)
            log_large = tl.log(tl.maximum(cur_beta, 1e-20))
            sigma = tl.exp(0.5 * (frac * log_large + (1.0 - frac) * tl.log(var)))
        else:
            sigma = tl.sqrt(var)
        out = tl.where(tt > 0, out + sigma * z, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("fastddpm::ddpm_step_triton", mutates_args={})
def ddpm_step_triton(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    predicted_variance: torch.Tensor | None,
    seed: int,
    offset: int,
    noise_mode: int,
    prediction_type: int,
    variance_type: int,
    clip_range: float,
    return_pred: bool,
    offset_tensor: torch.Tensor | None = None,
    diffusers_beta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = noise if noise_mode == NOISE_TENSOR else None
    off_t = offset_tensor if noise_mode == NOISE_PHILOX else None
    pv = predicted_variance if variance_type in (LEARNED, LEARNED_RANGE) else None
    io = Layout(sample, model_output, z, pv, row_major=noise_mode == NOISE_PHILOX)
    xs, ms, zs, ps = io.ins
    out, pred = io.outputs(return_pred)
    io.launch(_ddpm_step_kernel, xs, ms, zs if zs is not None else xs, ps if ps is not None else xs, out,
              pred if return_pred else out, t, prev_t, alphas_cumprod, off_t if off_t is not None else t,
              alphas_cumprod.shape[0], io.numel, io.per_sample, seed, offset, clip_range,
              NOISE_MODE=noise_mode, PRED_TYPE=prediction_type, VAR_TYPE=variance_type, CLIP=clip_range > 0,
              RETURN_PRED=return_pred, OFFSET_PTR=off_t is not None, DIFFUSERS_BETA=diffusers_beta)
    return io.finish(out, pred, return_pred)


@triton.jit
def _philox_normal_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    offs, mask = elements(n, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offset + offs), mask=mask)


@triton.jit
def _philox_bits_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    offs, mask = elements(n, BLOCK)
    c0, c1, c2, c3 = tl.randint4x(seed, offset + offs)
    tl.store(out_ptr + 4 * offs, c0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, c1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, c2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, c3.to(tl.int32, bitcast=True), mask=mask)


def philox_normal_triton(shape: tuple[int, ...], seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """Normals of the in-kernel noise stream (element i is normal(seed, offset + i))."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n:
        with launch_device(out):
            _philox_normal_kernel[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, BLOCK=BLOCK)
    return out


def philox_bits_triton(n: int, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """The four Philox words of counters offset .. offset + n - 1, as int32 (n, 4)."""
    out = torch.empty((n, 4), dtype=torch.int32, device=device)
    if n:
        with launch_device(out):
            _philox_bits_kernel[(triton.cdiv(n, 256),)](out, n, seed, offset, BLOCK=256)
    return out
