"""attention: softmax(Q K^T * scale) V over the positions of a feature map, forward and backward.

Backends:

* ``cpu``: PyTorch's scaled_dot_product_attention on CPU tensors (its CPU flash kernel). Measured faster
  here than the materialised formula, and a kernel of our own would reimplement the same blocked
  algorithm over the same BLAS (benchmarks/README.md, "Attention"). fp16/bf16 inputs are computed in
  fp32 on the CPU (DESIGN.md: the CPU path is fp32) and returned in their dtype.
* ``cuda``: scaled_dot_product_attention on CUDA tensors restricted to its fused backends (flash,
  memory-efficient, cuDNN; memory-efficient covers d = 512), never the materialising math backend.
* ``triton``: the flash-style kernels of fastddpm.triton_kernels.attention (d <= 512, on GPUs whose blocks
  may have the shared memory the kernels need: at d = 512, 129 KiB in float32, more than sm_86/sm_89 allow;
  ``auto`` then picks ``cuda``).
* ``torch``: the materialised reference (fastddpm.ops.reference.attention).

``auto`` picks ``cpu`` for CPU tensors. For CUDA tensors it follows the GPU run recorded in
benchmarks/README.md ("GPU run: NVIDIA H100"; both backends matched float64 there, forward and backward):
at the CIFAR-10 U-Net's shape (16 x 256 tokens x 256) SDPA was 3.9x faster than the Triton kernel in
float32 (the Triton kernel uses exact fp32 dots, no TF32) and the Triton kernel 1.3x faster than SDPA in
bfloat16, so ``auto`` picks ``cuda`` for float32 and ``triton`` for float16/bfloat16 (``cuda`` for
d > 512): fastddpm.ops._dispatch.MEASURED_CUDA_ORDER. One shape was measured; ``gpu_bench_attention``
covers the rest where a GPU exists. Every backend is differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _checks, _dispatch, reference

MAX_TRITON_HEAD_DIM = 512
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _sdpa_cpu(q, k, v, scale):
    if q.dtype in (torch.float16, torch.bfloat16):
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return o.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_cuda(q, k, v, scale):
    with sdpa_kernel(_CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _triton(q, k, v, scale):
    from ..triton_kernels.attention import attention_triton

    return attention_triton(q, k, v, scale)


def _torch(q, k, v, scale):
    return reference.attention(q, k, v, scale)


_IMPLS = {"cpu": _sdpa_cpu, "cuda": _sdpa_cuda, "triton": _triton, "torch": _torch}


_GPU_SHARED: dict[torch.device, tuple[int, int, int]] = {}


def _gpu_shared(device: torch.device) -> tuple[int, int, int]:
    """(major, minor, shared memory a block may have, opt-in) of a CUDA device, read once per device (a
    dictionary lookup that torch.compile traces; the first read is not traced)."""
    got = _GPU_SHARED.get(device)
    return got if got is not None else _read_gpu_shared(device)


@torch.compiler.disable
def _read_gpu_shared(device: torch.device) -> tuple[int, int, int]:
    p = torch.cuda.get_device_properties(device)
    # (a torch without the opt-in figure: the most any GPU allows, so that nothing is refused on a guess)
    got = _GPU_SHARED[device] = (p.major, p.minor, getattr(p, "shared_memory_per_block_optin", 232448))
    return got


def triton_limit(d: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the Triton kernel cannot serve head width ``d`` in ``dtype`` on ``device``, or None if it can:
    ``auto`` then picks the next backend, and ``backend="triton"`` raises with this reason."""
    if d > MAX_TRITON_HEAD_DIM:
        return f"the Triton kernel serves head widths d <= {MAX_TRITON_HEAD_DIM}, got d = {d}"
    if device.type == "cuda":
        from ..triton_kernels.attention import shared_memory_reason

        return shared_memory_reason(d, dtype, *_gpu_shared(device))
    return None


_dispatch.LIMITS["attention"] = lambda b, d, dtype, device: triton_limit(d, dtype, device) if b == "triton" else None


def _check(q, k, v, scale) -> None:
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _checks.check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions (B, heads, N, d), got shape {tuple(x.shape)}")
    for x, name in ((k, "k"), (v, "v")):
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {x.dtype}")
    B, H, N, d = q.shape
    if d == 0:
        raise ValueError(f"q: head width d (last dimension) must be at least 1, got shape {tuple(q.shape)}")
    if N == 0:
        raise ValueError(f"q: sequence length N (dimension 2) must be at least 1, got shape {tuple(q.shape)}")
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != d:
        raise ValueError(f"k: expected shape ({B}, {H}, M, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k: sequence length M (dimension 2) must be at least 1, got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(Q K^T * scale) V, fused (the score matrix is never stored on the cpu/cuda/triton backends).

    Args:
        q: queries (B, heads, N, d), float32/float16/bfloat16 (float64 on the ``torch`` backend), any strides.
        k: keys (B, heads, M, d), same dtype and device as ``q``.
        v: values (B, heads, M, d), same shape as ``k``.
        scale: multiplies the scores; default ``d ** -0.5``.
        backend: "auto", "cpu", "cuda", "triton" or "torch" (see the module docstring).

    Returns:
        (B, heads, N, d) in q's dtype; differentiable in q, k and v. Softmax statistics are fp32.
    """
    _check(q, k, v, scale)
    d = q.shape[-1]

    b = _dispatch.resolve("attention", backend, q.device, q.dtype, d)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    return _IMPLS[b](q, k, v, s)


__all__ = ["attention", "MAX_TRITON_HEAD_DIM"]
