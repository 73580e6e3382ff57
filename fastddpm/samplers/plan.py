"""The sampling plan: what a sampling loop needs before it sees the model or the images (the schedule, the
(t, prev_t) pair of every step, the settings), and the per-step helpers that both loops, the eager one of
fastddpm.sample and the CUDA-graph one (graph.py), share: calling the model, splitting its output, the fused
step with the plan's settings, and x_T.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from .. import ops
from ..schedule import NoiseSchedule
from .respace import space_timesteps, step_tables

__all__ = ["SamplingPlan", "plan_sampling", "prepare", "call_model", "split_output", "fused_step", "initial_noise"]

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
NOISES = ("torch", "philox")


@dataclass
class SamplingPlan:
    """Everything a sampling loop needs that does not depend on the images: the schedule, the
    (t, prev_t) pair of every step in order, and the settings. Built on the host, once."""

    schedule: NoiseSchedule
    shape: tuple[int, ...]
    t: torch.Tensor  # (n,) int64, descending
    prev_t: torch.Tensor  # (n,) int64, t[i + 1] and -1 at the end
    sampler: str
    eta: float
    prediction_type: str
    variance_type: str
    clip_denoised: bool
    noise: str
    device: torch.device
    dtype: torch.dtype
    use_clipped_model_output: bool = True  # DDIM: eps recomputed from the clipped x0

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def philox_offset(self, i: int) -> int:
        """Counter offset of step i's noise: x_T takes [0, numel), step i takes the next numel."""
        return (i + 1) * self.numel


def plan_sampling(shape, *, steps=None, sampler="ddpm", eta=0.0, schedule=None, timesteps=None,
                  prediction_type="epsilon", variance_type="fixed_small", clip_denoised=True, noise="torch",
                  device=None, dtype=None, use_clipped_model_output=True) -> SamplingPlan:
    """Check the settings and build the step tables (no model, no images)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if noise not in NOISES:
        raise ValueError(f"noise: expected one of {', '.join(NOISES)}, got {noise!r}")
    if prediction_type not in ops.PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {', '.join(ops.PREDICTION_TYPES)}, got {prediction_type!r}")
    if variance_type not in ops.VARIANCE_TYPES:
        raise ValueError(f"variance_type: expected one of {', '.join(ops.VARIANCE_TYPES)}, got {variance_type!r}")
    if sampler != "ddpm" and variance_type in ("learned", "learned_range"):
        raise ValueError("variance_type: the learned variance types apply to sampler='ddpm' only")
    if sampler != "ddpm" and variance_type not in ("fixed_small", "fixed_small_log"):  # read by DDPM alone
        raise ValueError(f"variance_type: DDPM's sigma_t, applies to sampler='ddpm' only, got {variance_type!r} "
                         f"with sampler={sampler!r}")
    if sampler != "ddim" and use_clipped_model_output is False:  # read by DDIM alone
        raise ValueError(f"use_clipped_model_output: DDIM's choice of epsilon, applies to sampler='ddim' only, got "
                         f"False with sampler={sampler!r}")
    eta = ops.check_eta(eta)
    if eta and sampler != "ddim":  # only DDIM reads eta: ignoring it would hide a mistake (the CLI refuses it too)
        raise ValueError(f"eta: DDIM's eta applies to sampler='ddim' only, got eta={eta} with sampler={sampler!r}")
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):  # torch's int size is 1-D: never images
        raise TypeError(f"shape: expected a tuple (batch, channels, ...) of positive ints, got int {shape}")
    shape = ops.check_shape(shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape: expected (batch, channels, ...) with positive sizes, got {shape}")
    schedule = schedule if schedule is not None else NoiseSchedule()
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    T = schedule.num_train_timesteps
    if timesteps is not None:
        if steps is not None:
            raise ValueError("steps, timesteps: pass one of them, not both")
        ts = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        if not ts:
            raise ValueError("timesteps: expected at least one timestep, got none")
        bad = [t for t in ts if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t)
               or float(t) != int(t)]
        if bad:  # 999.7 would be truncated to 999 without a word
            raise ValueError(f"timesteps: expected integers, got {bad[0]!r}")
        ts = [int(t) for t in ts]
        if any(int(t) < 0 or int(t) >= T for t in ts):
            raise ValueError(f"timesteps: expected values in [0, {T}), got {ts}")
        if len(set(int(t) for t in ts)) != len(ts):
            raise ValueError("timesteps: expected distinct values")
    else:
        if steps is None:
            # (DPM-Solver++'s linspace spacing repeats a timestep beyond T - 1 steps)
            steps = T if sampler == "ddpm" else min(50, T) if sampler == "ddim" else min(20, max(T - 1, 1))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if steps > T:
            raise ValueError(f"steps: {steps} is more than the schedule's {T} training timesteps")
        if sampler == "dpm++2m":  # diffusers' spacing, so that the loop is diffusers' loop
            from .dpmpp import dpmpp_timesteps

            ts = dpmpp_timesteps(T, steps)
        else:
            ts = list(range(T)) if steps == T else space_timesteps(T, steps)
    device = ops.check_device(device) if device is not None else torch.device("cpu")
    t, prev = step_tables(ts)
    return SamplingPlan(schedule=schedule, shape=shape, t=t, prev_t=prev, sampler=sampler, eta=float(eta),
                        prediction_type=prediction_type, variance_type=variance_type,
                        clip_denoised=bool(clip_denoised), noise=noise, device=device,
                        dtype=dtype or torch.float32, use_clipped_model_output=bool(use_clipped_model_output))


def steady_weights(model):
    """``model.steady_weights()`` (a fastddpm UNet: its per-step constants made once for a sampling loop), else
    a block that does nothing."""
    fn = getattr(model, "steady_weights", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def call_model(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """model(x, t) for a fastddpm UNet, a plain callable, or a diffusers UNet2DModel (``.sample``)."""
    out = model(x, t)
    if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model: expected it to return a tensor (or an object with .sample), got {type(out).__name__}"
        )
    return out


def split_output(plan: SamplingPlan, out: torch.Tensor, x: torch.Tensor):
    """(model output, predicted variance or None), checked against x's shape."""
    C = x.shape[1]
    learned = plan.variance_type in ("learned", "learned_range")
    if learned:
        if out.shape[1] != 2 * C or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output: variance_type={plan.variance_type!r} needs 2 x {C} channels (output and "
                f"variance), got shape {tuple(out.shape)} for images of shape {tuple(x.shape)}"
            )
        m, pv = torch.split(out, C, dim=1)
        return m.to(x.dtype), pv.to(x.dtype)
    if out.shape != x.shape:
        hint = " (2x channels: pass variance_type='learned_range')" if out.dim() == x.dim() and \
            out.shape[1] == 2 * C else ""
        raise ValueError(f"model output: expected shape {tuple(x.shape)}, got {tuple(out.shape)}{hint}")
    return out.to(x.dtype), None


STEP_OPS = {"ddpm": "ddpm_step", "ddim": "ddim_step", "dpm++2m": "dpmpp_step"}


def prepare(plan: SamplingPlan, backend: str = "auto") -> ops.PreparedStep:
    """The fused step op of ``plan.sampler`` for the plan's device and dtype (fastddpm.ops.prepare_step): the
    backend resolved and the schedule's table fetched once for the whole loop, not at every step."""
    return ops.prepare_step(STEP_OPS[plan.sampler], plan.schedule, plan.device, plan.dtype, backend)


def fused_step(plan: SamplingPlan, step: ops.PreparedStep, x, m, pv, t, prev_t, noise, generator, seed, offset):
    """One fused step (DDPM or DDIM) with the plan's settings; ``step`` is :func:`prepare`'s. ``noise``: a
    tensor, None (draw from ``generator``), "philox" or "none". The plan checked the settings, timesteps and
    seed once, split_output the output's shape and dtype; the model may still have put it on another device."""
    ops.check_like(m, x, "model_output", "sample")
    if plan.sampler == "ddpm":
        return step(x, m, t, prev_t, noise=noise, generator=generator, prediction_type=plan.prediction_type,
                    variance_type=plan.variance_type, clip_sample=plan.clip_denoised, predicted_variance=pv,
                    seed=seed, offset=offset)[0]
    return step(x, m, t, prev_t, eta=plan.eta, noise=noise, generator=generator,
                prediction_type=plan.prediction_type, clip_sample=plan.clip_denoised,
                use_clipped_model_output=plan.use_clipped_model_output, seed=seed, offset=offset)[0]


def initial_noise(plan: SamplingPlan, generator, seed) -> torch.Tensor:
    """x_T: from the generator (drawn on its device, then moved, as diffusers' randn_tensor) or Philox."""
    if plan.noise == "philox":
        return ops.philox_randn(plan.shape, seed, 0, device=plan.device).to(plan.dtype)
    gd = generator.device if generator is not None else plan.device
    return torch.randn(plan.shape, generator=generator, device=gd, dtype=plan.dtype).to(plan.device)
