"""Shared test helpers: backends per device, tolerances, poisoning."""

from __future__ import annotations

import math
import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()


def stable_seed(*parts) -> int:
    """A seed that depends only on ``parts`` (a test's parameters), the same in every process.

    Python's hash() of a str is randomised per process (PYTHONHASHSEED), so a failure seeded from it
    cannot be replayed; crc32 of the repr is fixed. Parameters must have a stable repr (tuples, str,
    numbers, torch dtypes, None)."""
    return zlib.crc32(repr(parts).encode())


def backends_for(device: torch.device, op: str) -> list[str]:
    """The backends that can run ``op`` on ``device`` here (Triton through its interpreter on the CPU)."""
    from fastddpm.ops import _dispatch

    out = []
    for b in ("cpu", "cuda", "triton", "torch"):
        if _dispatch.backend_unavailable_reason(b, op, device) is None:
            out.append(b)
    return out


def repo_env(**overrides: str) -> dict[str, str]:
    """The environment for a subprocess that imports this checkout's fastddpm: the repository first on
    PYTHONPATH, then ``overrides``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **overrides}


def devices_to_test() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if HAS_CUDA:
        devs.append(torch.device("cuda"))
    return devs


# Relative error bounds against the float64 reference (DESIGN.md, Numerics).
ELEMENTWISE_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual - ref| / max(|ref|, 1): relative for large values, absolute near zero."""
    a, r = actual.double(), ref.double()
    return ((a - r).abs() / r.abs().clamp(min=1.0)).max().item() if r.numel() else 0.0


def rel_norm(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """||actual - ref|| / ||ref|| (Frobenius): the relative error of a whole network's output."""
    return ((actual.double() - ref.double()).norm() / ref.double().norm()).item()


def half_bound(eager_err: float, dtype: torch.dtype) -> float:
    """The fp16/bf16 error bound against float64 (DESIGN.md, flash-attention's rule): twice the
    error of torch's own eager result in that dtype, and no less than one ulp of the dtype (where
    eager happens to round exactly, one rounding the other way is still a correct result)."""
    return max(2 * eager_err, torch.finfo(dtype).eps)


def assert_close_ref(actual: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, eager=None,
                     rtol: float | None = None, what: str = "") -> None:
    """Kernel output against the float64 reference.

    fp32: elementwise bound ``rtol`` (default 1e-6 scaled by a small ulp factor);
    fp16/bf16: ``half_bound``: no more than twice the error of ``eager`` (torch's own
    result in that dtype), at least one ulp of the dtype.
    """
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in output"
    err = rel_err(actual, ref64)
    if dtype == torch.float32 or eager is None:
        bound = rtol if rtol is not None else ELEMENTWISE_RTOL[dtype]
    else:
        bound = half_bound(rel_err(eager, ref64), dtype)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} ({dtype})"


def poison_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter afresh (norm weights near 1, biases near 0, other weights ~ 1/sqrt(fan_in)):
    weights of exactly 1 and biases of exactly 0 hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


def assert_backends_tested(op: str) -> None:
    """Every backend that should run ``op`` here is among backends_for()'s (a backend that stopped resolving
    would drop out of the op's tests silently): torch always, triton where it imports, the C++ CPU kernel on
    the CPU, the CUDA kernel on a GPU when fastddpm._C was built with CUDA."""
    from conftest import TRITON_OK

    try:  # written by setup.py: whether fastddpm._C was built with CUDA kernels
        from fastddpm._build_info import WITH_CUDA
    except ImportError:
        WITH_CUDA = False
    for dev in devices_to_test():
        tested = backends_for(dev, op)
        assert "torch" in tested
        if TRITON_OK:
            assert "triton" in tested, f"triton imports but is not tested on {dev}: {tested}"
        if dev.type == "cpu":
            assert "cpu" in tested, f"the C++ CPU kernel is not tested: {tested}"
        elif WITH_CUDA:  # built with CUDA kernels: a GPU run must exercise them
            assert "cuda" in tested, f"fastddpm._C was built with CUDA but its kernel is not tested: {tested}"
