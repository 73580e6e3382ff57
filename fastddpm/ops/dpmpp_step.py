"""dpmpp_step: one DPM-Solver++(2M) update (Lu et al. 2022), fused into one pass over memory."""

from __future__ import annotations

from typing import Literal

import torch

from ..schedule import NoiseSchedule
from . import _checks, _library, prepared

PredictionType = Literal["epsilon", "sample", "v_prediction"]


def _host_check(sample: torch.Tensor) -> bool:
    # timestep order is checked on the host where that costs no device sync, and not while tracing
    return sample.is_cpu and not torch.compiler.is_compiling()


def _prev_timesteps(prev_t, B: int, device: torch.device, T: int) -> torch.Tensor:
    # Any prev_t < 0 is the end (sigma = 0), as diffusers reads a step past t = 0.
    if isinstance(prev_t, bool) or not isinstance(prev_t, (int, torch.Tensor)):
        raise TypeError(f"prev_t: expected an int or an integer tensor, got {type(prev_t).__name__}")
    if isinstance(prev_t, int):
        if not prev_t < T:
            raise ValueError(f"prev_t: expected a timestep in (-inf, {T}), got {prev_t}")
        return torch.full((B,), max(prev_t, -1), dtype=torch.int64, device=device)
    if prev_t.dtype.is_floating_point or prev_t.dtype.is_complex or prev_t.dtype == torch.bool:
        raise TypeError(f"prev_t: expected an integer tensor (int64 or int32), got {prev_t.dtype}")
    pt = prev_t.reshape(1).expand(B) if prev_t.dim() == 0 else prev_t
    if pt.dim() != 1 or pt.shape[0] != B:
        raise ValueError(f"prev_t: expected shape ({B},) (one timestep per sample) or a scalar, got "
                         f"{tuple(prev_t.shape)}")
    return pt.to(device=device, dtype=torch.int64).clamp(min=-1).contiguous()


def dpmpp_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    schedule: NoiseSchedule,
    prev_t: torch.Tensor | int | None = None,
    prev_x0: torch.Tensor | None = None,
    last_t: torch.Tensor | int | None = None,
    prediction_type: PredictionType = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    *,
    return_pred_original: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x at ``prev_t`` from x at ``t`` by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, data prediction).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_prev - lambda_t
    and D0 the model's x0 prediction at t (clipped with ``clip_sample``):
    first order (``prev_x0`` None): x_prev = (sigma_prev / sigma_t) x - alpha_prev (e^{-h} - 1) D0;
    second order (``prev_x0`` = D_1, the prediction made at ``last_t``; r0 = (lambda_t - lambda_last) / h):
    the same with D0 + (D0 - D_1) / (2 r0), diffusers' DPMSolverMultistepScheduler (algorithm_type=
    "dpmsolver++", solver_type="midpoint"). ``prev_t`` < 0 steps to sigma = 0, which gives D0 (the last
    step of diffusers' final_sigmas_type="zero", taken first order there as here).

    Args:
        sample: x_t, (B, ...), float32/float16/bfloat16, any strides.
        model_output: the model's prediction at t, same shape/dtype/device.
        t: per-sample timesteps (int64 (B,), or an int for all), in [0, T).
        schedule: the :class:`~fastddpm.NoiseSchedule` (its ``alphas_cumprod`` table).
        prev_t: the timestep stepped to, < t (below 0: the end, sigma = 0); default t - 1.
        prev_x0: the previous step's x0 prediction (the second return of the previous call), or None.
        last_t: the timestep of ``prev_x0``, > t; required with it.
        prediction_type: "epsilon", "sample" or "v_prediction".
        clip_sample, clip_sample_range: clip the x0 prediction (DPM-Solver++'s thresholding with a static
            threshold; diffusers' thresholding=True with sample_max_value=1 is the clip to [-1, 1]).
        return_pred_original: also return D0, to pass as ``prev_x0`` to the next step.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
    """
    _checks.check_step(sample, model_output, schedule, prediction_type, clip_sample, clip_sample_range)
    T = schedule.num_train_timesteps
    B = sample.shape[0]
    if type(t) is int and 0 <= t < T and (prev_t is None or (type(prev_t) is int and prev_t < t)):
        # a sampler's loop: valid ints, passed on (the prepared step caches them as a pair)
        tt, pt = t, (None if prev_t is None else max(prev_t, -1))
    else:
        tt = _checks.timesteps(t, B, sample.device, T)
        pt = (tt - 1) if prev_t is None else _prev_timesteps(prev_t, B, sample.device, T)
        if _host_check(sample) and not _checks.all_less(pt, tt):
            raise ValueError("prev_t: expected prev_t < t for every sample")
    lt = None
    if prev_x0 is not None:
        _checks.check_like(prev_x0, sample, "prev_x0", "sample")
        if last_t is None:
            raise ValueError("last_t: required with prev_x0 (the timestep of that prediction)")
        lt = _checks.timesteps(last_t, B, sample.device, T, name="last_t")
        if type(t) is int and type(last_t) is int:
            ok = last_t > t
        else:
            tv = _checks.int_timesteps(t, B, sample.device) if type(t) is int else tt
            ok = not _host_check(sample) or _checks.all_less(tv, lt)
        if not ok:
            raise ValueError("last_t: expected last_t > t for every sample")
    elif last_t is not None:
        raise ValueError("last_t: given without prev_x0")

    step = prepared.cached_step("dpmpp_step", schedule, sample.device, sample.dtype, backend)
    prev, pred = step(sample, model_output, tt, pt, prev_x0=prev_x0, last_t=lt, prediction_type=prediction_type,
                      clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                      return_pred_original=return_pred_original)
    return (prev, pred) if return_pred_original else prev


# The C++ op's fake (schema in csrc/ops.cpp).
if _library.has_c():

    @torch.library.register_fake("fastddpm::dpmpp_step")
    def _dpmpp_step_fake(sample, model_output, prev_x0, t, prev_t, last_t, ac, prediction_type, clip_range,
                         return_pred):
        return prepared.step_fake(sample, return_pred)

__all__ = ["dpmpp_step"]
