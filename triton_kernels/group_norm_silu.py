"""GroupNorm (+ SiLU) in Triton, forward and backward, NCHW and channels_last (NHWC).

The reductions are split across many programs so that a batch of one fills a large GPU: each
program covers one (n, group) and a slice of the spatial positions, as a [BLOCK_S, BLOCK_D] tile
(spatial x channels of the group), and writes partial sums; a second small step combines them in a
fixed order (deterministic, no atomics). The elementwise passes are flat over x's storage.

Forward:  partial shifted sums (x - K, K = the mean of 64 values of the group) -> mean, rstd per (n, g)
          -> y = silu((x - mean) rstd w + b).
Backward: per (n, c) partial sums of dz and dz xhat (recomputing z from x) -> per-(n, g)
          coefficients and dweight/dbias (tiny (N, C) tensors, combined with torch) ->
          dx = rstd (w dz - c1 - c2 (x - mean)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import elements, launch_device


@triton.jit
def _slice(sp, S_PER, HW):
    # the positions [s_begin, s_end) of slice sp of a group's HW positions
    s_begin = sp * S_PER
    return s_begin, tl.minimum(s_begin + S_PER, HW)


@triton.jit
def _tile_offsets(n, g, s0, s_end, C, HW, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr):
    # offsets of the (BLOCK_S positions from s0) x (BLOCK_D channels of group g) tile of sample n, masked to
    # positions below s_end (<= HW) and the group's D channels
    s = s0 + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    c = g * D + d
    if CL:
        offs = (n * HW + s[:, None]) * C + c[None, :]
    else:
        offs = (n * C + c[None, :]) * HW + s[:, None]
    mask = (s[:, None] < s_end) & (d[None, :] < D)
    return offs, mask


@triton.jit
def _shift(x_ptr, n, g, C, HW, D, CL: tl.constexpr):
    # The shift K of the sums: the mean of (up to) the first 64 positions of the group's first
    # channel. The variance's rounding error grows with ((mean - K) / sigma)^2, and a single element
    # could be an outlier. Every program of the group computes the same K, in the same order.
    s = tl.arange(0, 64)
    m = s < HW
    if CL:
        offs = (n * HW + s) * C + g * D
    else:
        offs = (n * C + g * D) * HW + s
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return tl.sum(v, axis=0) / tl.sum(m.to(tl.float32), axis=0)


@triton.jit
def _program(SPLIT):
    # (n * G + g, slice), int64, from a 1-D grid of N * G * SPLIT programs (``_split_grid``): on axis 1
    # the slice count would be capped at 65,535.
    pid = tl.program_id(0).to(tl.int64)
    return pid // SPLIT, pid % SPLIT


@triton.jit
def _stats_partial_kernel(x_ptr, p1_ptr, p2_ptr, C, HW, G, D, S_PER, SPLIT,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CL: tl.constexpr):
    ng, sp = _program(SPLIT)
    n = ng // G
    g = ng % G
    K = _shift(x_ptr, n, g, C, HW, D, CL)
    acc1 = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    s_begin, s_end = _slice(sp, S_PER, HW)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs, mask = _tile_offsets(n, g, s0, s_end, C, HW, D, BLOCK_S, BLOCK_D, CL)
        v = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - K, 0.0)
        acc1 += v
        acc2 += v * v
    tl.store(p1_ptr + ng * SPLIT + sp, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(p2_ptr + ng * SPLIT + sp, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _stats_final_kernel(x_ptr, p1_ptr, p2_ptr, mean_ptr, rstd_ptr, C, HW, G, D, SPLIT, eps, M,
                        BLOCK_P: tl.constexpr, CL: tl.constexpr):
    # M: the group's element count D * HW as an fp32 (from the host: an int32 product would wrap at 2**31).
    ng = tl.program_id(0).to(tl.int64)
    n = ng // G
    g = ng % G
    K = _shift(x_ptr, n, g, C, HW, D, CL)
    p = tl.arange(0, BLOCK_P)
    s1 = tl.sum(tl.load(p1_ptr + ng * SPLIT + p, mask=p < SPLIT, other=0.0), axis=0)
    s2 = tl.sum(tl.load(p2_ptr + ng * SPLIT + p, mask=p < SPLIT, other=0.0), axis=0)
    m1 = s1 / M
    var = tl.maximum(s2 / M - m1 * m1, 0.0)
    tl.store(mean_ptr + ng, K + m1)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _channel_and_group(offs, C, HW, G, D, CL: tl.constexpr):
    if CL:
        c = offs % C
        n = offs // (HW * C)
    else:
        c = (offs // HW) % C
        n = offs // (C * HW)
    return c, n * G + c // D


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _apply_elements(x_ptr, mean_ptr, rstd_ptr, total, C, HW, G, D, CL: tl.constexpr, BLOCK: tl.constexpr):
    # what both apply kernels start from, per element of this program: offsets and mask, its channel and
    # (sample, group), x in fp32 and its group's mean and rstd
    offs, mask = elements(total, BLOCK)
    c, ng = _channel_and_group(offs, C, HW, G, D, CL)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + ng, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + ng, mask=mask, other=1.0)
    return offs, mask, c, ng, x, mean, rstd


@triton.jit
def _fwd_apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, total, C, HW, G, D,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs, mask, c, ng, x, mean, rstd = _apply_elements(x_ptr, mean_ptr, rstd_ptr, total, C, HW, G, D, CL, BLOCK)
    a = rstd
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    z = (x - mean) * a
    if HAS_B:
        z = z + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = z * _sigmoid(z)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(x, dy, mean, a, b, SILU: tl.constexpr):
    # (dz, x - mean) with z = (x - mean) a + b.
    xc = x - mean
    if SILU:
        z = xc * a + b
        s = _sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    else:
        dz = dy
    return dz, xc


@triton.jit
def _bwd_partial_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pa_ptr, pb_ptr,
                        C, HW, G, D, S_PER, SPLIT,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Per (n, c) partial sums over a slice of the spatial positions: A = sum dz, B = sum dz xhat.
    ng, sp = _program(SPLIT)
    n = ng // G
    g = ng % G
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    d = tl.arange(0, BLOCK_D)
    c = g * D + d
    dmask = d < D
    a = tl.zeros([BLOCK_D], dtype=tl.float32) + rstd
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=dmask, other=1.0).to(tl.float32)
    b = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=dmask, other=0.0).to(tl.float32)
    acc_a = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    s_begin, s_end = _slice(sp, S_PER, HW)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs, mask = _tile_offsets(n, g, s0, s_end, C, HW, D, BLOCK_S, BLOCK_D, CL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz, xc = _dz(x, dy, mean, a[None, :], b[None, :], SILU)
        dz = tl.where(mask, dz, 0.0)
        acc_a += dz
        acc_b += dz * xc
    out = (n * C + c) * SPLIT + sp
    tl.store(pa_ptr + out, tl.sum(acc_a, axis=0), mask=dmask)
    tl.store(pb_ptr + out, tl.sum(acc_b, axis=0) * rstd, mask=dmask)


@triton.jit
def _bwd_apply_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, c1_ptr, c2_ptr,
                      total, C, HW, G, D,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs, mask, c, ng, x, mean, rstd = _apply_elements(x_ptr, mean_ptr, rstd_ptr, total, C, HW, G, D, CL, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.full([BLOCK], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    dz, xc = _dz(x, dy, mean, rstd * w, b, SILU)
    c1 = tl.load(c1_ptr + ng, mask=mask, other=0.0)
    c2 = tl.load(c2_ptr + ng, mask=mask, other=0.0)
    dx = rstd * (w * dz - c1 - c2 * xc)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------
def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    cl = _is_channels_last(x)
    return (x if cl or x.is_contiguous() else x.contiguous()), cl


def _geometry(x: torch.Tensor, num_groups: int):
    N, C = x.shape[0], x.shape[1]
    HW = 1
    for s in x.shape[2:]:
        HW *= s
    D = C // num_groups
    BLOCK_D = triton.next_power_of_2(max(D, 1))  # C == 0: no channel, and no kernel runs
    # Slices of the spatial positions per (n, group): about 4K elements a program, and at least
    # _MIN_PROGRAMS programs in all, so that a batch of one fills a large GPU (1x128x32x32 with 32
    # groups is 32 groups of 4096 elements: one program each would leave most SMs idle).
    want = max(triton.cdiv(HW * D, 4096), triton.cdiv(_MIN_PROGRAMS, max(N * num_groups, 1)))
    hw2 = triton.next_power_of_2(max(HW, 1))
    # A tile holds at most 2048 elements and, when slicing, at least _MIN_TILE (or the whole run).
    BLOCK_S = max(1, min(2048 // BLOCK_D, triton.next_power_of_2(triton.cdiv(max(HW, 1), want))))
    BLOCK_S = min(hw2, max(BLOCK_S, _MIN_TILE // BLOCK_D, 1))
    split = max(1, min(want, triton.cdiv(HW, BLOCK_S)))
    s_per = triton.cdiv(triton.cdiv(HW, split), BLOCK_S) * BLOCK_S if HW else 0
    split = triton.cdiv(HW, s_per) if HW else 1
    return N, C, HW, D, BLOCK_D, BLOCK_S, split, s_per


# At least this many programs for the reductions (a few per SM of a 132-SM H100/H200), each
# covering at least _MIN_TILE elements.
_MIN_PROGRAMS = 512
_MIN_TILE = 256


_APPLY_BLOCK = 1024


def _split_grid(rows: int, split: int) -> tuple[int]:
    """The grid of the sliced reductions: rows * split programs on one axis (limit 2**31 - 1)."""
    n = rows * split
    if n >= 2**31:
        raise ValueError(f"group_norm_silu: {n} programs exceed a CUDA grid (2**31 - 1)")
    return (n,)


@triton_op("fastddpm::group_norm_silu_triton_fwd", mutates_args={})
def group_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           num_groups: int, eps: float, silu: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xd, cl = _dense(x)
    G = num_groups
    N, C, HW, D, BLOCK_D, BLOCK_S, split, s_per = _geometry(xd, G)
    y = torch.empty_like(xd)
    mean = torch.empty((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N, G), dtype=torch.float32, device=x.device)
    if N * G == 0:
        return y, mean, rstd
    if HW * D == 0:  # empty groups (no positions, or no channels): the CPU kernel's statistics
        mean.fill_(0.0)
        rstd.fill_(1.0 / eps ** 0.5)
        return y, mean, rstd
    p1 = torch.empty((N * G, split), dtype=torch.float32, device=x.device)
    p2 = torch.empty_like(p1)
    total = xd.numel()
    with launch_device(xd):
        wrap_triton(_stats_partial_kernel)[_split_grid(N * G, split)](
            xd, p1, p2, C, HW, G, D, s_per, split, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, CL=cl)
        wrap_triton(_stats_final_kernel)[(N * G,)](
            xd, p1, p2, mean, rstd, C, HW, G, D, split, eps, float(D * HW), BLOCK_P=triton.next_power_of_2(split),
            CL=cl)
        wrap_triton(_fwd_apply_kernel)[(triton.cdiv(total, _APPLY_BLOCK),)](
            xd, y, mean, rstd, weight if weight is not None else xd, bias if bias is not None else xd,
            total, C, HW, G, D, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, CL=cl,
            BLOCK=_APPLY_BLOCK)
    return y, mean, rstd


@triton_op("fastddpm::group_norm_silu_triton_bwd", mutates_args={})
def group_norm_silu_triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                               silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xd, cl = _dense(x)
    G = num_groups
    N, C, HW, D, BLOCK_D, BLOCK_S, split, s_per = _geometry(xd, G)
    dy = grad_y.to(xd.dtype)
    dy = dy.movedim(1, -1).contiguous().movedim(-1, 1) if cl else dy.contiguous()
    if cl and not _is_channels_last(dy):  # size-1 dims make the check ambiguous: force the strides
        dy = torch.empty_like(xd).copy_(dy)
    dx = torch.empty_like(xd)
    pa = torch.zeros((N, C, split), dtype=torch.float32, device=x.device)
    pb = torch.zeros_like(pa)
    if N * C * HW > 0:
        with launch_device(xd):
            wrap_triton(_bwd_partial_kernel)[_split_grid(N * G, split)](
                xd, dy, mean, rstd, weight if weight is not None else xd, bias if bias is not None else xd,
                pa, pb, C, HW, G, D, s_per, split, HAS_W=weight is not None, HAS_B=bias is not None,
                SILU=silu, CL=cl, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)
    A = pa.sum(dim=2)  # (N, C): sum dz
    B = pb.sum(dim=2)  # (N, C): sum dz xhat
    wf = weight.float() if weight is not None else torch.ones(C, device=x.device)
    M = max(D * HW, 1)
    c1 = (A * wf).reshape(N, G, D).sum(dim=2) / M  # (N, G)
    c2 = rstd * (B * wf).reshape(N, G, D).sum(dim=2) / M
    total = xd.numel()
    if total > 0:
        with launch_device(xd):
            wrap_triton(_bwd_apply_kernel)[(triton.cdiv(total, _APPLY_BLOCK),)](
                xd, dy, dx, mean, rstd, weight if weight is not None else xd, bias if bias is not None else xd,
                c1.contiguous(), c2.contiguous(), total, C, HW, G, D, HAS_W=weight is not None,
                HAS_B=bias is not None, SILU=silu, CL=cl, BLOCK=_APPLY_BLOCK)
    dw = B.sum(dim=0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = A.sum(dim=0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db
