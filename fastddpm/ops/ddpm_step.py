"""ddpm_step: one reverse step of DDPM, fused into one pass over memory."""

from __future__ import annotations

from typing import Literal

import torch

from ..schedule import NoiseSchedule
from . import _checks, _dispatch, _library, prepared, reference
from ._codes import VARIANCE_TYPES

PredictionType = Literal["epsilon", "sample", "v_prediction"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


def ddpm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    schedule: NoiseSchedule,
    prev_t: torch.Tensor | int | None = None,
    noise: torch.Tensor | Literal["philox", "none"] | None = None,
    generator: torch.Generator | None = None,
    prediction_type: PredictionType = "epsilon",
    variance_type: VarianceType = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
    diffusers_beta: bool = False,
    predicted_variance: torch.Tensor | None = None,
    return_pred_original: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} from x_t and the model's output, exactly as diffusers' DDPMScheduler.step.

    Predicted x0 (Ho et al. eq. 15), optional clip to ``[-clip_sample_range,
    clip_sample_range]``, posterior mean (eq. 7), plus sigma_t z where t > 0. With
    epsilon prediction and no clipping this is
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z.

    Args:
        sample: x_t, (B, ...), float32/float16/bfloat16, any strides.
        model_output: the model's prediction, same shape/dtype/device.
        t: per-sample timesteps (int64 (B,), or an int for all), in [0, T).
        schedule: the :class:`~fastddpm.NoiseSchedule`.
        prev_t: the timestep stepped to (default t - 1; respaced schedules pass
            their own). Any prev_t < 0 is the end of the chain, where abar_prev = 1, as
            diffusers reads it: with 50 of 1000 steps, t = 0 steps to prev_t = -20.
        noise: z. A tensor (same shape as ``sample``); None to draw
            ``torch.randn(sample.shape, generator=generator)`` as diffusers does;
            "philox" to generate z inside the kernel from ``seed`` and ``offset``
            (element i gets normal(seed, offset + i) from the same Philox words on every
            backend; the normals agree to a few ulp across backends: Triton's sqrt is approximate);
            "none" for the posterior mean alone.
        generator: the torch.Generator for noise=None (taken, unused, with "none"; refused with a noise tensor
            or "philox", which would ignore it).
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small", "fixed_small_log", "fixed_large", "learned"
            or "learned_range" (the last two need ``predicted_variance``).
        clip_sample, clip_sample_range: clip the predicted x0.
        seed, offset: the Philox stream for noise="philox". ``offset`` may be a 0-d int64 tensor on the
            sample's device, read inside the kernel (no host sync): a CUDA graph replays the step with
            whatever it holds at replay. The same value as an int gives bitwise the same result.
        diffusers_beta: evaluate beta_t = 1 - abar_t / abar_prev as diffusers does in fp32, whose
            cancellation is off by up to ~5e-4 (relative) where beta_t ~ 1e-4 (a whole loop's numbers move by
            ~5e-5), to return diffusers' own numbers (the DDPMScheduler drop-in); default the exact form
            (abar_prev - abar_t) / abar_prev.
        predicted_variance: the model's variance output for the learned types.
        return_pred_original: also return the predicted x0.
        backend: "auto", "cpu", "cuda", "triton" or "torch".

    Returns:
        x_{t-1}, or (x_{t-1}, predicted x0) with ``return_pred_original``.
    """
    _checks.check_step(sample, model_output, schedule, prediction_type, clip_sample, clip_sample_range)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type: expected one of {', '.join(VARIANCE_TYPES)}, got {variance_type!r}")
    if variance_type in ("learned", "learned_range"):
        if predicted_variance is None:
            raise ValueError(f"predicted_variance: required for variance_type={variance_type!r}")
        _checks.check_like(predicted_variance, sample, "predicted_variance", "sample")
    elif predicted_variance is not None:
        raise ValueError(f"predicted_variance: only used by the learned variance types, not {variance_type!r}")
    device = sample.device
    tt, pt = _checks.step_timesteps(t, prev_t, sample.shape[0], device, schedule.num_train_timesteps)
    _checks.check_noise(noise, seed, offset, sample, generator)

    step = prepared.cached_step("ddpm_step", schedule, device, sample.dtype, backend)
    prev, pred = step(
        sample, model_output, tt, pt, noise=noise, generator=generator, prediction_type=prediction_type,
        variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range, seed=seed,
        offset=offset, diffusers_beta=diffusers_beta, predicted_variance=predicted_variance,
        return_pred_original=return_pred_original,
    )
    return (prev, pred) if return_pred_original else prev


def philox_randn(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    offset: int = 0,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """The normals that ``ddpm_step(noise="philox")`` adds: element i is normal(seed, offset + i).

    ``shape`` is a tuple (list, torch.Size) of non-negative ints, or one int for a 1-D tensor (as torch.randn).
    """
    shape = _checks.check_shape(shape)
    _checks.philox_stream(seed, offset)
    device = _checks.check_device(device)
    b = _dispatch.resolve("philox_normal_", backend, device, torch.float32)
    if b == "torch":
        return reference.philox_normal(shape, seed, offset, device, torch.float32)
    if b == "triton":
        from ..triton_kernels.ddpm_step import philox_normal_triton

        return philox_normal_triton(shape, seed, offset, device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    torch.ops.fastddpm.philox_normal_(out, seed, offset)
    return out


# The C++ ops' fakes (schemas in csrc/ops.cpp).
if _library.has_c():

    @torch.library.register_fake("fastddpm::ddpm_step")
    def _ddpm_step_fake(sample, model_output, t, prev_t, ac, noise, pv, seed, offset, noise_mode,
                        prediction_type, variance_type, clip_range, return_pred, offset_tensor=None,
                        diffusers_beta=False):
        return prepared.step_fake(sample, return_pred)

    @torch.library.register_fake("fastddpm::ddpm_step_randn")
    def _ddpm_step_randn_fake(sample, model_output, t, prev_t, ac, generator, prediction_type, variance_type,
                              clip_range, return_pred, diffusers_beta=False):
        return prepared.step_fake(sample, return_pred)

    @torch.library.register_fake("fastddpm::philox_normal_")
    def _philox_normal_fake(out, seed, offset):
        return None

    @torch.library.register_fake("fastddpm::philox_bits_")
    def _philox_bits_fake(out, seed, offset):
        return None

__all__ = ["ddpm_step", "philox_randn"]
