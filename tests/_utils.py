"""Shared test helpers: backends per device, tolerances, poisoning."""

from __future__ import annotations

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
