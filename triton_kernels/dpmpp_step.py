"""dpmpp_step in Triton: the same per-element math as dpmpp_step_coeffs/dpmpp_x0/dpmpp_update in
csrc/include/fastddpm/dpmpp_step.h. Triton's interpreter has no libdevice, so log1p and expm1 are
evaluated with Kahan's tricks (log1p(x) = x log(u) / (u - 1), expm1(x) = (u - 1) x / log(u)), which keep
the few-ulp accuracy of the C++ log1pf/expm1f where x is small."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import Layout, elements, pred_x0, step_timesteps


@triton.jit
def _log1p(x):
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    u = tl.exp(x)
    lu = tl.log(u)
    return tl.where(u == 1.0, x, tl.where(lu == 0.0, u - 1.0, (u - 1.0) * (x / lu)))


@triton.jit
def _lambda_diff(ab_a, ab_b):
    d = ab_b - ab_a
    return 0.5 * (_log1p(d / ab_a) + _log1p(d / (1.0 - ab_b)))


@triton.jit
def _dpmpp_step_kernel(x_ptr, m_ptr, p_ptr, out_ptr, pred_ptr, t_ptr, pt_ptr, lt_ptr, ac_ptr,
                       T, n, M, clip_range,
                       PRED_TYPE: tl.constexpr, CLIP: tl.constexpr, SECOND: tl.constexpr,
                       RETURN_PRED: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = elements(n, BLOCK)
    b, tt, pt = step_timesteps(t_ptr, pt_ptr, offs, mask, M, T)
    final = pt < 0
    ab_s0 = tl.load(ac_ptr + tt, mask=mask, other=0.5)
    # Where final (or masked), some abar in (ab_s0, 1) stands in so that every lane stays finite (the
    # interpreter's numpy warns on 0/0 even in lanes tl.where discards); final lanes take x0 below.
    ab_t = tl.load(ac_ptr + tl.maximum(pt, 0), mask=mask, other=0.6)
    ab_t = tl.where(final, tl.minimum(ab_s0 * 1.5, 0.75 + 0.25 * ab_s0), ab_t)
    sqrt_ab = tl.sqrt(ab_s0)
    sqrt_1mab = tl.sqrt(1.0 - ab_s0)
    h = _lambda_diff(ab_s0, ab_t)
    k = -tl.sqrt(ab_t) * _expm1(-h)
    c_x = tl.sqrt((1.0 - ab_t) / (1.0 - ab_s0))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = pred_x0(x, m, sqrt_ab, sqrt_1mab, clip_range, PRED_TYPE, CLIP)
    if SECOND:
        lt = tl.load(lt_ptr + b, mask=mask, other=0)
        lt = tl.minimum(tl.maximum(lt, tt), T - 1)
        ab_s1 = tl.load(ac_ptr + lt, mask=mask, other=0.25)
        ab_s1 = tl.where(lt > tt, ab_s1, ab_s0 * 0.5)  # a bad last_t (checked on the host) stays finite
        half_inv_r0 = 0.5 * h / _lambda_diff(ab_s1, ab_s0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = c_x * x + k * (1.0 + half_inv_r0) * x0 - k * half_inv_r0 * p
    else:
        out = c_x * x + k * x0
    out = tl.where(final, x0, out)
    if RETURN_PRED:
        tl.store(pred_ptr + offs, x0.to(pred_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton_op("fastddpm::dpmpp_step_triton", mutates_args={})
def dpmpp_step_triton(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    prev_x0: torch.Tensor | None,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    last_t: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    prediction_type: int,
    clip_range: float,
    return_pred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    second = prev_x0 is not None
    io = Layout(sample, model_output, prev_x0)
    xs, ms, ps = io.ins
    out, pred = io.outputs(return_pred)
    io.launch(_dpmpp_step_kernel, xs, ms, ps if second else xs, out, pred if return_pred else out, t, prev_t,
              last_t if second else t, alphas_cumprod, alphas_cumprod.shape[0], io.numel, io.per_sample, clip_range,
              PRED_TYPE=prediction_type, CLIP=clip_range > 0, SECOND=second, RETURN_PRED=return_pred)
    return io.finish(out, pred, return_pred)
