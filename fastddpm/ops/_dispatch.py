"""Backend selection shared by every op.

Backends: ``cpu`` (C++), ``cuda`` (CUDA C++), ``triton``, ``torch`` (the
reference). ``auto`` picks ``cpu`` for CPU tensors and ``triton`` for CUDA
tensors, except the ops in ``CUDA_VERIFIED_OPS``, whose CUDA C++ kernels a GPU run
showed correct and faster, where it picks ``cuda``; other CUDA C++ kernels are used
only when asked for until a GPU run shows the same for them. ``FASTDDPM_BACKEND`` in the
environment replaces ``auto``. A backend that cannot serve an input raises
:class:`BackendNotSupported` with the reasons.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from . import _library

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Ops whose "cpu" and "cuda" backends are PyTorch's own kernels (attention: scaled_dot_product_attention,
# measured faster on this CPU than a kernel of ours), so they need no kernel in fastddpm._C.
TORCH_NATIVE_OPS = frozenset({"attention"})


# Ops whose CUDA C++ kernels a GPU run showed correct (against the float64 reference, on
# the device) and faster than the Triton kernels: auto picks "cuda" for their CUDA tensors.
# Evidence: benchmarks/results/gpu_h100_2026-11-25.* (H100, torch 2.11); see benchmarks/README.md.
CUDA_VERIFIED_OPS = frozenset({"q_sample", "ddpm_step", "philox_normal_"})


class BackendNotSupported(RuntimeError):
    """A backend that was asked for cannot serve this input; the message says why."""


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(importable, why not) for the Triton kernels."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, ""


def triton_interpreting() -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` in this process, or None if it can."""
    if backend == "torch":
        return None
    if backend in ("cpu", "cuda") and op in TORCH_NATIVE_OPS:
        if device.type != backend:
            return f"backend {backend!r} serves {backend} tensors, got tensors on {device}"
        return None
    if backend in ("cpu", "cuda"):
        if not _library.has_c():
            return f"the C++ extension fastddpm._C did not import ({_library.C_IMPORT_ERROR})"
        key = backend.upper()
        if device.type != backend:
            return f"backend {backend!r} serves {backend} tensors, got tensors on {device}"
        if not _library.has_kernel(op, key):
            if backend == "cuda":
                return (
                    f"fastddpm._C was built without CUDA kernels for {op} "
                    "(rebuild with a CUDA toolkit present, or FASTDDPM_CUDA=1)"
                )
            return f"fastddpm._C has no CPU kernel for {op}"
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cpu" and not triton_interpreting():
            return (
                "Triton runs CPU tensors only through its interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)"
            )
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels serve CUDA tensors, got tensors on {device}"
        return None
    return f"unknown backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}"


def resolve(
    op: str,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    extra_reason: Callable[[str], str | None] | None = None,
) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``.

    ``extra_reason(backend)`` lets an op add its own limits (head width, ...).
    """
    requested = backend or "auto"
    if requested == "auto":
        requested = os.environ.get("FASTDDPM_BACKEND", "auto") or "auto"
    if extra_reason is None and isinstance(requested, str):
        # What a backend can serve depends only on these (and on the environment, part of the
        # key), so a resolution is made once: this runs on every op call.
        key = (op, requested, device, dtype, os.environ.get("TRITON_INTERPRET"))
        b = _RESOLVED.get(key)
        if b is None:
            b = _resolve(op, requested, device, dtype, None)
            _RESOLVED[key] = b
        return b
    return _resolve(op, requested, device, dtype, extra_reason)


_RESOLVED: dict[tuple, str] = {}


def _resolve(
    op: str,
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    extra_reason: Callable[[str], str | None] | None,
) -> str:
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}, got {requested!r}")

    def reason(b: str) -> str | None:
        if dtype == torch.float64 and b != "torch":
            return "float64 inputs run only on the 'torch' (reference) backend"
        r = backend_unavailable_reason(b, op, device)
        if r is None and extra_reason is not None:
            r = extra_reason(b)
        return r

    if requested == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cpu":
            order = ("cpu", "torch")
        elif op in CUDA_VERIFIED_OPS:
            order = ("cuda", "triton", "torch")
        else:
            order = ("triton", "torch")
        for b in order:
            if reason(b) is None:
                return b
        return "torch"
    why = reason(requested)
    if why is not None:
        raise BackendNotSupported(f"{op}: backend {requested!r} cannot serve this input: {why}")
    return requested


def available_backends(op: str, device: torch.device) -> dict[str, str | None]:
    """Each backend mapped to None (usable) or the reason it is not, for ``op`` on ``device``."""
    return {b: backend_unavailable_reason(b, op, device) for b in BACKENDS}
