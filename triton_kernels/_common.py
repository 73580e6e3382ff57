"""Helpers shared by the Triton wrappers: memory layout (mirrors csrc/include/fastddpm/checks.h) and the
device a launch runs on. Here rather than in fastddpm.ops so that the kernels import nothing private
from the package above them."""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

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
