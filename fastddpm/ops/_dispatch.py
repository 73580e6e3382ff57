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

import contextlib
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


def _env_reader(name: str, default: str) -> Callable[[], str]:
    """A fast os.environ.get(name, default): it runs on every op call, where the public lookup
    (encoding the key, decoding the value) costs half a microsecond. Reads CPython's own mapping
    behind os.environ, which os.environ and putenv keep current; plain os.environ.get elsewhere."""
    data = getattr(os.environ, "_data", None)
    try:
        key = os.environ.encodekey(name)  # type: ignore[attr-defined]
        decode = os.environ.decodevalue  # type: ignore[attr-defined]
    except AttributeError:
        data = None
    if not isinstance(data, dict):
        return lambda: os.environ.get(name, default)

    def read() -> str:
        v = data.get(key)
        return default if v is None else decode(v)

    return read


_env_backend = _env_reader("FASTDDPM_BACKEND", "auto")
_env_triton_interpret = _env_reader("TRITON_INTERPRET", "0")


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
    if torch.compiler.is_compiling():  # traced: the public lookup, which torch.compile understands
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _env_triton_interpret() not in ("", "0")


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

    ``extra_reason(backend)`` lets an op add its own limits (head width, ...). Without one the
    answer depends only on the arguments and the environment, and is memoised (this runs on
    every op call; a cold resolution costs a few microseconds).
    """
    requested = backend or "auto"
    if torch.compiler.is_compiling():  # traced once per graph: no memo, the public env lookup
        env = os.environ.get("FASTDDPM_BACKEND", "auto") if requested == "auto" else None
        return _resolve(op, requested, env, device, dtype, extra_reason)
    env = _env_backend() if requested == "auto" else None
    if extra_reason is None:
        # Triton's availability on CPU tensors depends on TRITON_INTERPRET: part of the key
        # wherever Triton could be the answer.
        interp = triton_interpreting() if "triton" in (requested, env) or device.type != "cpu" else None
        return _resolve_memo(op, requested, env, device, dtype, interp)
    return _resolve(op, requested, env, device, dtype, extra_reason)


@functools.lru_cache(maxsize=256)
def _resolve_memo(op, requested, env, device, dtype, interpreting):  # interpreting: a key only
    return _resolve(op, requested, env, device, dtype, None)


def _resolve(op, requested, env, device, dtype, extra_reason):
    if requested == "auto":
        requested = env or "auto"
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


def available_backends(op: str, device: torch.device) -> dict[str, str | None]:
    """Each backend mapped to None (usable) or the reason it is not, for ``op`` on ``device``."""
    return {b: backend_unavailable_reason(b, op, device) for b in BACKENDS}
