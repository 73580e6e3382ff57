"""q_sample: the forward process x_t ~ q(x_t | x_0) in one fused pass."""

from __future__ import annotations

from typing import Literal

import torch

from ..schedule import NoiseSchedule
from . import _checks, _dispatch, _library

Target = Literal["eps", "x0", "v"]


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
    if b == "triton":
        _register_triton_autograd()
    xt, v = _dispatch.implementation("q_sample", b)(x0, noise, tt, sab, s1m, target == "v")
    if target is None:
        return xt
    return xt, {"eps": noise, "x0": x0, "v": v}[target]


# The C++ op's registrations (schema in csrc/ops.cpp): fake and autograd.
def _q_sample_fake(x0, noise, t, sqrt_ab, sqrt_1mab, with_v):
    xt = torch.empty_like(x0)
    v = torch.empty_like(x0) if with_v else x0.new_empty(0)
    return xt, v


def _q_sample_setup(ctx, inputs, output):
    x0, noise, t, sqrt_ab, sqrt_1mab, with_v = inputs
    ctx.save_for_backward(t, sqrt_ab, sqrt_1mab)
    ctx.with_v = with_v


def _q_sample_backward(ctx, grad_xt, grad_v):
    # x_t = a x0 + s eps and v = a eps - s x0 are linear in (x0, eps).
    t, sqrt_ab, sqrt_1mab = ctx.saved_tensors
    shape = (-1,) + (1,) * (grad_xt.dim() - 1)
    a = sqrt_ab[t].reshape(shape).to(grad_xt.dtype)
    s = sqrt_1mab[t].reshape(shape).to(grad_xt.dtype)
    g_x0, g_eps = a * grad_xt, s * grad_xt
    if ctx.with_v and grad_v is not None and grad_v.numel() > 0:
        g_x0 = g_x0 - s * grad_v
        g_eps = g_eps + a * grad_v
    return g_x0, g_eps, None, None, None, None


_TRITON_REGISTERED = False


def _register_triton_autograd() -> None:
    # The Triton op (torch.library.triton_op, registered when its module is first imported) has the same
    # arguments and the same linear backward.
    global _TRITON_REGISTERED
    if not _TRITON_REGISTERED:
        _dispatch.implementation("q_sample", "triton")  # imports the module that defines the op
        torch.library.register_autograd("fastddpm::q_sample_triton", _q_sample_backward,
                                        setup_context=_q_sample_setup)
        _TRITON_REGISTERED = True


if _library.has_c():
    torch.library.register_fake("fastddpm::q_sample")(_q_sample_fake)
    torch.library.register_autograd("fastddpm::q_sample", _q_sample_backward, setup_context=_q_sample_setup)

__all__ = ["q_sample"]
