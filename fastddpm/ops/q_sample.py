"""q_sample: the forward process x_t ~ q(x_t | x_0) in one fused pass."""

from __future__ import annotations

from typing import Literal

import torch

from ..schedule import NoiseSchedule
from . import _checks, _dispatch, _library, reference

Target = Literal["eps", "x0", "v"]


def _impl(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.fastddpm.q_sample
    if backend == "triton":
        from ..triton_kernels.q_sample import q_sample_triton

        return q_sample_triton
    return reference.q_sample


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    target: Target | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diffuse ``x0`` to step ``t``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args:
        x0: clean data, (B, ...), float32/float16/bfloat16, any strides.
        t: per-sample timesteps, int64 (B,) (or an int / 0-d tensor for all), in [0, T).
        noise: the epsilon, same shape, dtype and device as ``x0``.
        schedule: the :class:`~fastddpm.NoiseSchedule`.
        target: also return the training target, computed in the same pass:
            "eps" (the noise), "x0", or "v" (sqrt(abar_t) noise - sqrt(1 - abar_t) x0).
        backend: "auto", "cpu", "cuda", "triton" or "torch".

    Returns:
        x_t, or (x_t, target) when ``target`` is given.
    """
    _checks.check_tensor(x0, "x0")
    _checks.check_like(noise, x0, "noise", "x0")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    if target not in (None, "eps", "x0", "v"):
        raise ValueError(f"target: expected None, 'eps', 'x0' or 'v', got {target!r}")
    tt = _checks.timesteps(t, x0.shape[0], x0.device, schedule.num_train_timesteps)
    b = _dispatch.resolve("q_sample", backend, x0.device, x0.dtype)
    tables = schedule.tables(x0.device)
    sab, s1m = tables["sqrt_alphas_cumprod"], tables["sqrt_one_minus_alphas_cumprod"]
    if b == "torch" and x0.dtype == torch.float64:
        sab = schedule.table("sqrt_alphas_cumprod", x0.device, torch.float64)
        s1m = schedule.table("sqrt_one_minus_alphas_cumprod", x0.device, torch.float64)
    xt, v = _impl(b)(x0, noise, tt, sab, s1m, target == "v")
    if target is None:
        return xt
    return xt, {"eps": noise, "x0": x0, "v": v}[target]


__all__ = ["q_sample"]
_ = _library  # registrations (fake, autograd) happen on import
