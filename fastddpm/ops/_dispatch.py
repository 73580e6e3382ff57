"""Backend selection shared by every op.

Backends: ``cpu`` (C++), ``cuda`` (CUDA C++), ``triton``, ``torch`` (the
reference). ``auto`` picks ``cpu`` for CPU tensors. For CUDA tensors it follows the last GPU run
(``GPU_RUN``, ``GPU_EVIDENCE``): ``cuda`` only for the ops in ``CUDA_VERIFIED_OPS`` (that run's test
file for the op passed on the device and its GPU suite matched float64), else ``triton`` where the
GPU suite measured the Triton kernel correct, else ``torch``; where that run measured one correct backend
faster (``MEASURED_CUDA_ORDER``: attention), that one. Other CUDA C++ kernels are used only when asked for.
``FASTDDPM_BACKEND`` in the environment replaces ``auto``. A backend that cannot serve an input raises
:class:`BackendNotSupported` with the reasons.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable

import torch

from . import _checks, _library

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Ops whose "cpu" and "cuda" backends are PyTorch's own kernels (attention: scaled_dot_product_attention,
# measured faster on this CPU than a kernel of ours), so they need no kernel in fastddpm._C.
TORCH_NATIVE_OPS = frozenset({"attention"})


# The last GPU run: scripts/gpu_check.sh on a lent machine. Its results lie in ``results``.* (the GPU suite's
# table and CSV, the per-file pytest summary); "commit" is the last commit before the run (that run did
# not record its own: gpu_check.sh records it now).
GPU_RUN = {
    "device": "NVIDIA H100 80GB HBM3",
    "gpu": "H100",
    "date": "2026-11-25",
    "torch": "2.11.0",
    "commit": "8386f38",
    "results": "benchmarks/results/gpu_h100_2026-11-25",
}

# What that run showed, per op (the names resolve() is called with). "tests": the op's test file on the
# device, "passed" or what went wrong; "suite": the backends whose results the GPU suite matched against
# float64 on the device (empty: the op was not in the suite). tests/test_gpu_evidence.py re-derives every
# entry from the result files and checks README.md's backend table against it, so they cannot drift.
GPU_EVIDENCE = {
    "q_sample": {"test_file": "tests/test_q_sample.py",
                 "tests": "crashed (segmentation fault) after 22 tests", "suite": ("triton", "cuda")},
    "ddpm_step": {"test_file": "tests/test_ddpm_step.py", "tests": "passed", "suite": ("triton", "cuda")},
    # philox_normal_ (ops.philox_randn) is tested in test_ddpm_step.py and ran in the suite's Philox step
    "philox_normal_": {"test_file": "tests/test_ddpm_step.py", "tests": "passed", "suite": ("triton", "cuda")},
    "ddim_step": {"test_file": "tests/test_ddim_step.py",
                  "tests": "crashed (segmentation fault) after 41 tests", "suite": ()},
    "group_norm_silu_fwd": {"test_file": "tests/test_group_norm_silu.py",
                            "tests": "8 failures, then crashed (segmentation fault) after 52 tests",
                            "suite": ("triton", "cuda")},
    "attention": {"test_file": "tests/test_attention.py",
                  "tests": "2 of 116 tests failed (the attention block against diffusers on that machine's CPU)",
                  "suite": ("triton", "cuda")},
}


def _verified(op: str, backend: str) -> bool:
    e = GPU_EVIDENCE.get(op)
    return e is not None and e["tests"] == "passed" and backend in e["suite"]


# Ops whose CUDA C++ kernels the last GPU run verified: auto picks "cuda" for their CUDA tensors.
CUDA_VERIFIED_OPS = frozenset(op for op in GPU_EVIDENCE if _verified(op, "cuda"))
# Ops whose Triton kernels that run measured correct: auto's choice for their CUDA tensors where the CUDA
# C++ kernel is not verified; the others run the PyTorch path ("torch") on CUDA tensors.
TRITON_CORRECT_OPS = frozenset(op for op, e in GPU_EVIDENCE.items() if "triton" in e["suite"])


# Where that run measured one correct backend faster than the order below would pick: auto's order for
# CUDA tensors of the op, per dtype. attention (benchmarks/README.md, "GPU run: NVIDIA H100"; SDPA and the
# Triton kernel both matched float64 there, forward and backward): at the CIFAR-10 U-Net's shape (16 x 256
# tokens x 256) SDPA ("cuda", PyTorch's own kernels) was 3.9x faster than the Triton kernel in float32 (it
# uses exact fp32 dots, no TF32) and the Triton kernel 1.3x faster than SDPA in bfloat16. Where the Triton
# kernel cannot serve (d > 512), SDPA's fused kernels, never the materialised "torch" path.
_ATTENTION_HALF = ("triton", "cuda", "torch")
MEASURED_CUDA_ORDER = {
    "attention": {torch.float32: ("cuda", "torch"), torch.float16: _ATTENTION_HALF, torch.bfloat16: _ATTENTION_HALF},
}


def cuda_auto_order(op: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """The backends auto tries, in order, for CUDA tensors of ``op`` (of ``dtype``): a measured preference
    (``MEASURED_CUDA_ORDER``), else the verified CUDA C++ kernel, the Triton kernel the last GPU run measured
    correct, the PyTorch path."""
    measured = MEASURED_CUDA_ORDER.get(op, {}).get(dtype)
    if measured is not None:
        return measured
    return (("cuda",) if op in CUDA_VERIFIED_OPS else ()) + (("triton",) if op in TRITON_CORRECT_OPS else ()) + (
        "torch",)


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


MIN_TRITON = (3, 4)


def _version_tuple(v: str) -> tuple[int, ...]:
    """(3, 4, 0) for "3.4.0", "3.4.0rc1" or "3.4.0+git1234"."""
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(usable, why not) for the Triton kernels: importable, and Triton >= 3.4, whose tl.randn draws the
    Philox4x32 words the other backends draw (older Triton uses Philox4x64 for int64 offsets)."""
    try:
        import triton
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        return False, (f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))} "
                       "(its Philox noise differs from the other backends'); upgrade triton")
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


# An op's own limits beyond its backends' availability: ``LIMITS[op](backend, key, dtype, device)`` says why
# ``backend`` cannot serve an input that ``key`` summarises (a hashable value the op passes to resolve():
# attention's head width, group_norm_silu's number of dimensions), or None. Each op module registers its
# own; None for a key of None. A limit must depend only on its arguments (and the device's fixed
# properties): resolve() memoises its answer with the key.
LIMITS: dict[str, Callable[[str, object, torch.dtype, torch.device], str | None]] = {}


_BACKEND_NAMES = frozenset(("auto", *BACKENDS))


def check_backend(value: object, name: str = "backend") -> str:
    """``value`` if it names a backend ("auto" or one of BACKENDS), else a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in _BACKEND_NAMES:
        raise ValueError(f"{name}: expected one of auto, {', '.join(BACKENDS)}, got {value!r}")
    return value


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype, key: object = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype`` (and ``key``, see LIMITS).

    The answer depends only on the arguments and the environment, and is memoised (this runs on every op
    call; a cold resolution costs a few microseconds).
    """
    requested = check_backend(backend or "auto")  # (before the memo, which would hash it)
    if torch.compiler.is_compiling():  # traced once per graph: no memo, the public env lookup
        env = os.environ.get("FASTDDPM_BACKEND", "auto") if requested == "auto" else None
        return _resolve(op, requested, env, device, dtype, key)
    env = _env_backend() if requested == "auto" else None
    # Triton's availability on CPU tensors depends on TRITON_INTERPRET: part of the key
    # wherever Triton could be the answer.
    interp = (triton_interpreting() if "triton" in (requested, env) or _checks.device_type(device) != "cpu"
              else None)
    return _resolve_memo(op, requested, env, device, dtype, interp, key)


@functools.lru_cache(maxsize=256)
def _resolve_memo(op, requested, env, device, dtype, interpreting, key):  # interpreting: a key only
    return _resolve(op, requested, env, device, dtype, key)


def _resolve(op, requested, env, device, dtype, key):
    if requested == "auto" and env:
        requested = check_backend(env, "FASTDDPM_BACKEND")

    def reason(b: str) -> str | None:
        if dtype == torch.float64 and b != "torch":
            return "float64 inputs run only on the 'torch' (reference) backend"
        r = backend_unavailable_reason(b, op, device)
        if r is None and key is not None and op in LIMITS:
            r = LIMITS[op](b, key, dtype, device)
        return r

    if requested == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cpu":
            order = ("cpu", "torch")
        else:
            order = cuda_auto_order(op, dtype)
        for b in order:
            if reason(b) is None:
                return b
        return "torch"
    why = reason(requested)
    if why is not None:
        raise BackendNotSupported(f"{op}: backend {requested!r} cannot serve this input: {why}")
    return requested


def implementation(op: str, backend: str) -> Callable:
    """The function that runs ``op`` on a resolved ``backend`` (arguments as its schema in csrc/ops.cpp):
    the C++ op for "cpu"/"cuda", ``triton_kernels.<op>.<op>_triton`` for "triton", ``reference.<op>`` for
    "torch"."""
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.fastddpm, op)
    if backend == "triton":
        return getattr(importlib.import_module(f"..triton_kernels.{op}", __package__), f"{op}_triton")
    from . import reference

    return getattr(reference, op)


def available_backends(op: str, device: torch.device) -> dict[str, str | None]:
    """Each backend mapped to None (usable) or the reason it is not, for ``op`` on ``device``."""
    return {b: backend_unavailable_reason(b, op, device) for b in BACKENDS}
