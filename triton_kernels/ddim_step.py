"""ddim_step in Triton: the same per-element math as ddim_step_coeffs/ddim_mean in
csrc/include/fastddpm/elementwise.h; in-kernel noise is tl.randn(seed, offset + i)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import (
    EPSILON,
    NO_NOISE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    SAMPLE,
    Layout,
    pred_x0,
    step_beta,
    step_elements,
    step_noise,
)


@triton.jit
def _ddim_step_kernel(x_ptr, m_ptr, z_ptr, out_ptr, pred_ptr, t_ptr, pt_ptr, ac_ptr, off_ptr,
                      T, n, M, seed, offset, final_ac, eta, clip_range,
                      NOISE_MODE: tl.constexpr, PRED_TYPE: tl.constexpr, CLIP: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, RETURN_PRED: tl.constexpr, OFFSET_PTR: tl.constexpr,
                      DIFFUSERS_BETA: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, tt, pt, ab_t, ab_prev, x, m = step_elements(x_ptr, m_ptr, t_ptr, pt_ptr, ac_ptr, T, n, M, final_ac,
                                                            BLOCK)
    beta_prod_t = 1.0 - ab_t
    beta_prod_prev = 1.0 - ab_prev
    cur_beta = step_beta(ab_t, ab_prev, DIFFUSERS_BETA)
    var = tl.maximum(beta_prod_prev / beta_prod_t * cur_beta, 0.0)
    sqrt_ab = tl.sqrt(ab_t)
    sqrt_1mab = tl.sqrt(beta_prod_t)
    std = eta * tl.sqrt(var)
    c_eps = tl.sqrt(tl.maximum(beta_prod_prev - std * std, 0.0))
    x0 = pred_x0(x, m, sqrt_ab, sqrt_1mab, clip_range, PRED_TYPE, CLIP)
    # the model's eps (from the unclipped prediction)
    if PRED_TYPE == EPSILON:
        eps = m
    elif PRED_TYPE == SAMPLE:
        eps = (x - sqrt_ab * m) * (1.0 / sqrt_1mab)
    else:
        eps = sqrt_ab * m + sqrt_1mab * x
    if USE_CLIPPED:
        eps = (x - sqrt_ab * x0) * (1.0 / sqrt_1mab)
    if RETURN_PRED:
        tl.store(pred_ptr + offs, x0.to(pred_ptr.dtype.element_ty), mask=mask)
    out = tl.sqrt(ab_prev) * x0 + c_eps * eps
    if NOISE_MODE != NO_NOISE:
        out = out + std * step_noise(z_ptr, off_ptr, offs, mask, seed, offset, NOISE_MODE, OFFSET_PTR)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("fastddpm::ddim_step_triton", mutates_args={})
def ddim_step_triton(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    noise: torch.Tensor | None,
    seed: int,
    offset: int,
    noise_mode: int,
    prediction_type: int,
    eta: float,
    clip_range: float,
    use_clipped_model_output: bool,
    return_pred: bool,
    offset_tensor: torch.Tensor | None = None,
    diffusers_beta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    mode = noise_mode if eta > 0 else NO_NOISE
    z = noise if mode == NOISE_TENSOR else None
    off_t = offset_tensor if mode == NOISE_PHILOX else None
    io = Layout(sample, model_output, z, row_major=mode == NOISE_PHILOX)
    xs, ms, zs = io.ins
    out, pred = io.outputs(return_pred)
    io.launch(_ddim_step_kernel, xs, ms, zs if zs is not None else xs, out, pred if return_pred else out, t, prev_t,
              alphas_cumprod, off_t if off_t is not None else t, alphas_cumprod.shape[0], io.numel, io.per_sample,
              seed, offset, final_alpha_cumprod, eta, clip_range, NOISE_MODE=mode, PRED_TYPE=prediction_type,
              CLIP=clip_range > 0, USE_CLIPPED=use_clipped_model_output, RETURN_PRED=return_pred,
              OFFSET_PTR=off_t is not None, DIFFUSERS_BETA=diffusers_beta)
    return io.finish(out, pred, return_pred)
