"""q_sample in Triton: one program per BLOCK elements, per-sample coefficients gathered in-kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import Layout, elements


@triton.jit
def _q_sample_kernel(x0_ptr, eps_ptr, xt_ptr, v_ptr, t_ptr, sab_ptr, s1m_ptr, T, n, M,
                     WITH_V: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = elements(n, BLOCK)
    tt = tl.load(t_ptr + offs // M, mask=mask, other=0)
    tt = tl.minimum(tl.maximum(tt, 0), T - 1)  # never read outside the table
    a = tl.load(sab_ptr + tt, mask=mask, other=0.0)
    s = tl.load(s1m_ptr + tt, mask=mask, other=0.0)
    x = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(xt_ptr + offs, (a * x + s * e).to(xt_ptr.dtype.element_ty), mask=mask)
    if WITH_V:
        tl.store(v_ptr + offs, (a * e - s * x).to(v_ptr.dtype.element_ty), mask=mask)


@triton_op("fastddpm::q_sample_triton", mutates_args={})
def q_sample_triton(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor,
    with_v: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    io = Layout(x0, noise)
    xin, ein = io.ins
    xt, v = io.outputs(with_v)
    io.launch(_q_sample_kernel, xin, ein, xt, v if with_v else xt, t, sqrt_alphas_cumprod,
              sqrt_one_minus_alphas_cumprod, sqrt_alphas_cumprod.shape[0], io.numel, io.per_sample, WITH_V=with_v)
    return io.finish(xt, v, with_v)
