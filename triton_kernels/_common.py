"""Helpers shared by the Triton wrappers: memory layout (mirrors csrc/include/fastddpm/checks.h) and the
device a launch runs on. Here rather than in fastddpm.ops so that the kernels import nothing private
from the package above them."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# The integer codes of the C++ schemas, named as csrc/include/fastddpm/elementwise.h names them (kEpsilon, ...;
# fastddpm/ops/_codes.py holds the same table for Python): the kernels compare their constexpr arguments with
# these names, never with bare numbers (tests/test_codebase.py checks the three tables and the kernels).
EPSILON = tl.constexpr(0)
SAMPLE = tl.constexpr(1)
V_PREDICTION = tl.constexpr(2)
FIXED_SMALL = tl.constexpr(0)
FIXED_SMALL_LOG = tl.constexpr(1)
FIXED_LARGE = tl.constexpr(2)
LEARNED = tl.constexpr(4)
LEARNED_RANGE = tl.constexpr(5)
NO_NOISE = tl.constexpr(0)
NOISE_TENSOR = tl.constexpr(1)
NOISE_PHILOX = tl.constexpr(2)


# ----------------------------------------------------------------------------- per-element pieces of the steps
BLOCK = 1024  # elements per program of the elementwise kernels (Layout.launch)


@triton.jit
def elements(n, BLOCK: tl.constexpr):
    """This program's BLOCK element offsets (int64: no overflow past 2**31 elements) and their mask < n."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def step_elements(x_ptr, m_ptr, t_ptr, pt_ptr, ac_ptr, T, n, M, final_ac, BLOCK: tl.constexpr):
    """What every step kernel starts from, per element of this program: offsets and mask, t and prev_t
    (step_timesteps), abar_t and abar_prev (``final_ac`` where prev_t < 0), x_t and the model output in fp32."""
    offs, mask = elements(n, BLOCK)
    b, tt, pt = step_timesteps(t_ptr, pt_ptr, offs, mask, M, T)
    ab_t = tl.load(ac_ptr + tt, mask=mask, other=0.5)
    ab_prev = tl.where(pt >= 0, tl.load(ac_ptr + tl.maximum(pt, 0), mask=mask, other=1.0), final_ac)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, tt, pt, ab_t, ab_prev, x, m


@triton.jit
def step_noise(z_ptr, off_ptr, offs, mask, seed, offset, NOISE_MODE: tl.constexpr, OFFSET_PTR: tl.constexpr):
    """z of each element: the noise tensor's (NOISE_TENSOR), or normal(seed, offset + i) from Philox, with the
    counter offset read on the device under OFFSET_PTR (a CUDA graph replays a new one)."""
    if NOISE_MODE == NOISE_TENSOR:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif OFFSET_PTR:
        z = tl.randn(seed, offset + tl.load(off_ptr) + offs)
    else:
        z = tl.randn(seed, offset + offs)
    return z


@triton.jit
def step_timesteps(t_ptr, pt_ptr, offs, mask, M, T):
    """(b, t, prev_t) of each element: its sample b, t clamped to [0, T), prev_t below t (the CUDA kernels'
    clamp_step_timesteps; the host checked the values, this keeps every lane's table reads in range)."""
    b = offs // M
    tt = tl.load(t_ptr + b, mask=mask, other=1)
    tt = tl.minimum(tl.maximum(tt, 0), T - 1)
    pt = tl.load(pt_ptr + b, mask=mask, other=0)
    pt = tl.where(pt >= tt, tt - 1, pt)
    return b, tt, pt


@triton.jit
def step_beta(ab_t, ab_prev, DIFFUSERS_BETA: tl.constexpr):
    """beta_t = 1 - abar_t / abar_prev (elementwise.h step_beta): diffusers' fp32 evaluation, or the exact
    subtraction of nearby values (Sterbenz)."""
    if DIFFUSERS_BETA:
        beta = 1.0 - ab_t / ab_prev
    else:
        beta = (ab_prev - ab_t) / ab_prev
    return beta


@triton.jit
def pred_x0(x, m, sqrt_ab, sqrt_1mab, clip_range, PRED_TYPE: tl.constexpr, CLIP: tl.constexpr):
    """x0 from the model output m at x_t (elementwise.h pred_x0: epsilon, Ho et al. eq. 15; sample; v, Salimans
    & Ho 2022), clipped to [-clip_range, clip_range] with CLIP."""
    if PRED_TYPE == EPSILON:
        x0 = (x - sqrt_1mab * m) * (1.0 / sqrt_ab)
    elif PRED_TYPE == SAMPLE:
        x0 = m
    else:
        x0 = sqrt_ab * x - sqrt_1mab * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    return x0


def batch_major_dense(*ts: torch.Tensor | None) -> bool:
    """True when all tensors share sizes and strides, are dense without overlap, and
    the batch is outermost: sample b is then one run of numel/B elements at b * stride(0)."""
    first = ts[0]
    if not _dense(first):
        return False
    B = first.shape[0]
    if B > 1 and first.stride(0) * B != first.numel():
        return False
    return all(t is None or (t.stride() == first.stride() and _dense(t)) for t in ts)


def _dense(t: torch.Tensor) -> bool:
    # is_non_overlapping_and_dense is not public; contiguity in some memory format covers the
    # layouts we serve directly (NCHW, channels_last, channels_last_3d).
    if t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def restore_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` (contiguous) in the memory format of ``like``."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    if like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out


class Layout:
    """The working layout of an elementwise op (checks.h's StepLayout): the operands as given when they share
    one batch-major dense layout, else contiguous copies (with ``row_major``, also when the first is not
    NCHW-contiguous: Philox noise is indexed in NCHW order). ``ins`` are the operands to launch on (None stays
    None); ``outputs`` allocates the output and an optional second one in that layout, ``finish`` returns them
    in the first operand's memory format."""

    def __init__(self, *tensors: torch.Tensor | None, row_major: bool = False):
        self.like = tensors[0]
        self.direct = batch_major_dense(*tensors) and not (row_major and not self.like.is_contiguous())
        self.ins = [u if self.direct or u is None else u.contiguous() for u in tensors]
        self.batch, self.numel = self.like.shape[0], self.like.numel()
        self.per_sample = self.numel // max(self.batch, 1)  # M: element i belongs to sample i // M

    def outputs(self, second: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.ins[0]
        return torch.empty_like(x), (torch.empty_like(x) if second else self.like.new_empty(0))

    def finish(self, out: torch.Tensor, out2: torch.Tensor, second: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.direct:
            out = restore_format(out, self.like)
            if second:
                out2 = restore_format(out2, self.like)
        return out, out2

    def launch(self, kernel, *args, **constexprs) -> None:
        """``kernel(*args, **constexprs, BLOCK=BLOCK)`` on one program per BLOCK elements, on the operands' device
        (nothing to launch for an empty tensor)."""
        if self.numel:
            with launch_device(self.like):
                wrap_triton(kernel)[(triton.cdiv(self.numel, BLOCK),)](*args, **constexprs, BLOCK=BLOCK)


def launch_device(t: torch.Tensor):
    """A context in which a Triton kernel for ``t`` launches on ``t``'s device and that device's current stream.

    Triton launches on the current device: with tensors on cuda:1 and cuda:0 current, a kernel would run
    on device 0 with device-1 pointers. Not needed (and not entered) for CPU tensors, under
    torch.compile (Inductor guards the device of the kernels it emits), or for fake tensors, whose
    CUDA device no runtime backs (CUDA is not initialised then, and entering would initialise it).
    """
    if t.device.type != "cuda" or torch.compiler.is_compiling() or not torch.cuda.is_initialized():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
