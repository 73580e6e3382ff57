"""ddim_step in Triton: the same per-element math as ddim_step_coeffs/ddim_mean in
csrc/include/fastddpm/elementwise.h; in-kernel noise is tl.randn(seed, offset + i)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    EPSILON,
    NO_NOISE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    SAMPLE,
    Layout,
    launch_device,
    step_beta,
    step_timesteps,
)


@triton.jit
def _ddim_step_kernel(x_ptr, m_ptr, z_ptr, out_ptr, pred_ptr, t_ptr, pt_ptr, ac_ptr, off_ptr,
                      T, n, M, seed, offset, final_ac, eta, clip_range,
                      NOISE_MODE: tl.constexpr, PRED_TYPE: tl.constexpr, CLIP: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, RETURN_PRED: tl.constexpr, OFFSET_PTR: tl.constexpr,
                      DIFFUSERS_BETA: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b, tt, pt = step_timesteps(t_ptr, pt_ptr, offs, mask, M, T)
    ab_t = tl.load(ac_ptr + tt, mask=mask, other=0.5)
    ab_prev = tl.where(pt >= 0, tl.load(ac_ptr + tl.maximum(pt, 0), mask=mask, other=1.0), final_ac)
    beta_prod_t = 1.0 - ab_t
    beta_prod_prev = 1.0 - ab_prev
    cur_beta = step_beta(ab_t, ab_prev, DIFFUSERS_BETA)
    var = tl.maximum(beta_prod_prev / beta_prod_t * cur_beta, 0.0)
    sqrt_ab = tl.sqrt(ab_t)
    sqrt_1mab = tl.sqrt(beta_prod_t)
    std = eta * tl.sqrt(var)
    c_eps = tl.sqrt(tl.maximum(beta_prod_prev - std * std, 0.0))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRED_TYPE == EPSILON:
        x0 = (x - sqrt_1mab * m) * (1.0 / sqrt_ab)
        eps = m
    elif PRED_TYPE == SAMPLE:
        x0 = m
        eps = (x - sqrt_ab * m) * (1.0 / sqrt_1mab)
    else:
        x0 = sqrt_ab * x - sqrt_1mab * m
        eps = sqrt_ab * m + sqrt_1mab * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if USE_CLIPPED:
        eps = (x - sqrt_ab * x0) * (1.0 / sqrt_1mab)
    if RETURN_PRED:
        tl.store(pred_ptr + offs, x0.to(pred_ptr.dtype.element_ty), mask=mask)
    out = tl.sqrt(ab_prev) * x0 + c_eps * eps
    if NOISE_MODE == NOISE_TENSOR:
        out = out + std * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE_MODE == NOISE_PHILOX:
        if OFFSET_PTR:  # the counter offset read on the device: a CUDA graph replays a new one
            out = out + std * tl.randn(seed, offset + tl.load(off_ptr) + offs)
        else:
            out = out + std * tl.randn(seed, offset + offs)
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
    B, n = io.batch, io.numel
    if n > 0:
        BLOCK = 1024
        with launch_device(xs):
            wrap_triton(_ddim_step_kernel)[(triton.cdiv(n, BLOCK),)](
                xs, ms, zs if zs is not None else xs, out, pred if return_pred else out, t, prev_t,
                alphas_cumprod, off_t if off_t is not None else t, alphas_cumprod.shape[0], n, n // B, seed,
                offset, final_alpha_cumprod, eta, clip_range, NOISE_MODE=mode, PRED_TYPE=prediction_type,
                CLIP=clip_range > 0, USE_CLIPPED=use_clipped_model_output, RETURN_PRED=return_pred,
                OFFSET_PTR=off_t is not None, DIFFUSERS_BETA=diffusers_beta, BLOCK=BLOCK,
            )
    return io.finish(out, pred, return_pred)
