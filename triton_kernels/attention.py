"""Flash-style self-attention in Triton, forward and backward (Dao 2023, FlashAttention-2, Alg. 1 and 2).

softmax(Q K^T * scale) V for q (B, H, N, d), k and v (B, H, M, d), any N, M >= 1, d <= 512, any strides.

* Online softmax: each program keeps a (BLOCK_M, d) fp32 accumulator and the running row max and sum;
  the N x M score matrix never exists in memory. The forward saves the log-sum-exp per query row (fp32,
  base 2, (B*H, N)); the backward recomputes the probabilities from it.
* Masking on every load for any N, M and d (d is padded to a power of two >= 16 inside the kernel).
* Head widths up to 512 fit because the query (and key) block shrinks as d grows (``_config``): the
  accumulator is BLOCK_M * d fp32 values per program, 16 * 512 at d = 512, where FlashAttention-2 and
  Triton's tutorial kernel stop at 256 and 128.
* Backward: one pass computes delta = rowsum(dO * O); then one kernel, launched twice: per key block it
  accumulates dK and dV over the query blocks, per query block dQ over the key blocks (no atomics).
* fp32 inputs use full-precision dots (input_precision="ieee": no TF32); fp16/bf16 inputs multiply in
  their dtype with fp32 accumulation and fp32 softmax statistics.

The ops are registered with torch.library.triton_op + wrap_triton (``fastddpm::attention_triton_fwd`` and
``fastddpm::attention_triton_bwd``) with autograd wired through register_autograd. Under Triton's CPU
interpreter the eager path works; the fake (meta) trace of a triton_op does not (torch tries to read a
meta tensor's storage), as DESIGN.md records.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import launch_device

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head width. For the dK/dV kernel
# BLOCK_N is its own key block and BLOCK_M the query block it loops over. Chosen so that ptxas reports no
# (or a few bytes of) register spills for sm_90 (Triton 3.8, compiled offline, no GPU here), not yet by a
# timed sweep. Compiled with each launch's own specialisation (scripts/compile_triton.py), fp16/bf16 spill
# nothing; fp32 spills 492 bytes in the forward at d = 128 and 64 in the dK/dV pass at d = 512
# (benchmarks/results/triton_sm90_launches.txt).
_HALF_CONFIGS = {
    "fwd": {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 2), 512: (16, 32, 8, 2)},
    "dkdv": {64: (64, 64, 4, 1), 128: (32, 64, 8, 1), 256: (32, 32, 8, 1), 512: (16, 16, 8, 1)},
    "dq": {64: (64, 64, 4, 1), 128: (64, 32, 4, 1), 256: (32, 32, 4, 1), 512: (16, 32, 8, 1)},
}
# fp32 operands multiply exactly (input_precision="ieee": TF32 misses the 1e-5 tolerance, and "tf32x3"
# spilled heavily and overflowed shared memory at d = 512), on tiles of twice the bytes: half the blocks.
_FP32_CONFIGS = {
    "fwd": {64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (16, 16, 4, 2), 512: (16, 16, 8, 2)},
    "dkdv": {64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1), 512: (16, 16, 8, 1)},
    "dq": {64: (32, 32, 4, 1), 128: (32, 16, 4, 1), 256: (16, 16, 4, 1), 512: (16, 16, 8, 1)},
}


# Shared memory (bytes) that the largest block of the three kernels (forward, dK/dV, dQ) needs, per head-width
# bucket of _config, for fp16/bf16 and for fp32 tiles, by compute capability (7: sm_75 stages tiles without
# asynchronous copies and needs more; 8: sm_80 and later). Triton 3.8, compiled offline for sm_90 and sm_75
# by scripts/compile_triton.py with the launch's own specialisation; tests/test_triton_compile.py checks each
# figure against the compiler (benchmarks/results/triton_sm90_launches.txt, triton_sm75_attention.txt). A
# GPU whose blocks may have less cannot launch the kernel: ``shared_memory_reason``.
SHARED_BYTES = {
    (7, "half"): {64: 49152, 128: 81920, 256: 98304, 512: 131072},
    (7, "fp32"): {64: 36864, 128: 51200, 256: 66560, 512: 132096},
    (8, "half"): {64: 40960, 128: 49152, 256: 65536, 512: 98304},
    (8, "fp32"): {64: 36864, 128: 51200, 256: 66560, 512: 132096},
}


def shared_bytes(d: int, dtype: torch.dtype, major: int) -> int:
    """The shared memory per block the kernels need at head width ``d`` (at most: the figure of d's bucket)."""
    return SHARED_BYTES[(min(max(major, 7), 8), "fp32" if dtype == torch.float32 else "half")][max(64, _block_d(d))]


def shared_memory_reason(d: int, dtype: torch.dtype, major: int, minor: int, per_block: int) -> str | None:
    """Why the kernels cannot launch on a GPU of compute capability major.minor whose blocks may have
    ``per_block`` bytes of shared memory (opt-in), or None if they can."""
    need = shared_bytes(d, dtype, major)
    if need <= per_block:
        return None
    return (f"the Triton kernel needs {need} bytes of shared memory per block at d = {d} in {str(dtype)[6:]}, and "
            f"this GPU (sm_{major}{minor}) allows {per_block}")


def _config(kernel: str, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    table = _FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS
    return table[kernel][max(64, _block_d(d))]


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter mis-multiplies bfloat16 operands in tl.dot (it reads their bits as other
    # values); under it, bf16 operands go in as fp32, which is exact (a bf16 x bf16 product fits in fp32,
    # as in the GPU's bf16 MMA with fp32 accumulation).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _program(L, BLOCK: tl.constexpr):
    # (block along the sequence of length L, b * H + h) from a 1-D grid of cdiv(L, BLOCK) * B * H programs
    # (``_grid``): axis 1 would cap B * H at 65,535.
    pid = tl.program_id(0)
    nblk = tl.cdiv(L, BLOCK)
    return pid % nblk, pid // nblk


@triton.jit
def _index(x, WIDE: tl.constexpr):
    # Row, column and head-width indices: int64 where an offset inside one (batch, head) slice can pass 2**31
    # (``_wide``), else int32: 64-bit address arithmetic on every tile element costs registers (up to 26 more
    # on sm_90). The (batch, head) base offsets are int64 always.
    if WIDE:  # (no early return: Triton's compiler requires one return type per function)
        x = x.to(tl.int64)
    return x


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether the largest element offset inside one (batch, head) slice of these (B, H, L, d) tensors reaches
    2**31, or a padded row index (up to L plus a block) could: the kernels then index in int64."""
    return any(sum((n - 1) * st for n, st in zip(t.shape[2:], t.stride()[2:])) >= 2**31
               or t.shape[2] + 64 >= 2**31 for t in tensors)


def _grid(L: int, block: int, BH: int) -> tuple[int]:
    """The launch grid of the attention kernels: one axis (limit 2**31 - 1), blocks of a head consecutive."""
    n = triton.cdiv(L, block) * BH
    if n >= 2**31:
        raise ValueError(f"attention: {n} programs exceed a CUDA grid (2**31 - 1)")
    return (n,)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # noqa: E741
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, N, M, D, qk_scale,  # qk_scale = scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
):
    pid_m, pid_bh = _program(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = _index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    offs_n = _index(tl.arange(0, BLOCK_N), WIDE)
    offs_d = _index(tl.arange(0, BLOCK_D), WIDE)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < M
        kT = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = _mm(q, kT, PREC, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block has a valid column
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,  # noqa: E741
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_j dO_ij O_ij = sum_j P_ij dP_ij, the softmax backward's row term.
    pid_m, pid_bh = _program(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # a light kernel: int64 always
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,  # strides of dO
    H, N, M, D, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, KEYS: tl.constexpr, WIDE: tl.constexpr,
):
    # KEYS: one key block per program, looping over the query blocks, accumulates dK and dV (on transposed
    # scores, (BLOCK_N, BLOCK_M)); else one query block per program, looping over the key blocks, accumulates
    # dQ. Launched once each way (no atomics).
    if KEYS:
        pid, pid_bh = _program(M, BLOCK_N)
    else:
        pid, pid_bh = _program(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = _index(tl.arange(0, BLOCK_D), WIDE)
    d_ok = offs_d < D
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * N
    if KEYS:
        offs_n = _index(pid * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
        offs_m = _index(tl.arange(0, BLOCK_M), WIDE)
        n_ok = offs_n < M
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < N
            qT = tl.load(q_base + rows[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
            # lse = +inf on padded rows makes their probabilities exactly 0.
            lse = tl.load(LSE + row_base + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + rows, mask=m_ok, other=0.0)
            pT = tl.exp2(_mm(k, qT, PREC, UPCAST) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
            pT = tl.where(n_ok[:, None], pT, 0.0)
            do = tl.load(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
            dv += _mm(pT.to(do.dtype), do, PREC, UPCAST)
            dpT = _mm(v, tl.trans(do), PREC, UPCAST)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            dk += _mm(dsT.to(qT.dtype), tl.trans(qT), PREC, UPCAST)
        out_off = offs_n[:, None] * D + offs_d[None, :]  # dK, dV are contiguous (B, H, M, D)
        out_base = pid_bh.to(tl.int64) * M * D
        tl.store(DK + out_base + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_base + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        offs_m = _index(pid * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
        offs_n = _index(tl.arange(0, BLOCK_N), WIDE)
        m_ok = offs_m < N
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, M, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < M
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            p = tl.exp2(_mm(q, tl.trans(k), PREC, UPCAST) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
            p = tl.where(n_ok[None, :], p, 0.0)
            dp = _mm(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PREC, UPCAST)
        out_off = offs_m[:, None] * D + offs_d[None, :]
        tl.store(DQ + pid_bh.to(tl.int64) * N * D + out_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16 operands


def _dot_args(dtype: torch.dtype) -> dict:
    return {"PREC": _prec(dtype), "UPCAST": _upcast(dtype)}


@triton_op("fastddpm::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, N, d) in q's dtype, log2-sum-exp of the scaled scores (B, H, N) fp32)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _config("fwd", D, q.dtype)
    with launch_device(q):
        wrap_triton(_attn_fwd_kernel)[_grid(N, bm, B * H)](
            q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, N, M, D, scale * LOG2E,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), **_dot_args(q.dtype), WIDE=_wide(q, k, v, o),
            num_warps=warps, num_stages=stages,
        )
    return o, lse


@triton_op("fastddpm::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         o: torch.Tensor, lse: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    M = k.shape[2]
    bd = _block_d(D)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dbm = min(64, 8192 // bd)  # two (dbm, d) tiles in registers
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, M, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, M, D), dtype=v.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride())
    wide = _wide(q, k, v, grad_o, dq, dk)
    with launch_device(q):
        wrap_triton(_attn_bwd_delta_kernel)[_grid(N, dbm, B * H)](
            o, grad_o, delta, *o.stride(), *grad_o.stride(), H, N, D, BLOCK_M=dbm, BLOCK_D=bd,
        )
        # The key-block launch holds two (BLOCK_N, d) fp32 accumulators (dK and dV), the query-block one dQ.
        for which, L, keys in (("dkdv", M, True), ("dq", N, False)):
            bm, bn, warps, stages = _config(which, D, q.dtype)
            wrap_triton(_attn_bwd_kernel)[_grid(L, bn if keys else bm, B * H)](
                q, k, v, grad_o, lse, delta, dq, dk, dv, *strides, H, N, M, D, scale * LOG2E, scale,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **_dot_args(q.dtype), KEYS=keys, WIDE=wide,
                num_warps=warps, num_stages=stages,
            )
    return dq, dk, dv


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        return None, None, None, None
    dq, dk, dv = attention_triton_bwd(grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


attention_triton_fwd.register_autograd(_backward, setup_context=_setup)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                     ) -> torch.Tensor:
    """softmax(Q K^T * scale) V through the Triton kernels (differentiable); inputs already checked."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return attention_triton_fwd(q, k, v, float(scale))[0]


__all__ = ["attention_triton", "attention_triton_fwd", "attention_triton_bwd", "MAX_HEAD_DIM"]
