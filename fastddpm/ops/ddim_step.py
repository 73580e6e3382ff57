"""ddim_step: one DDIM step (Song et al. 2021), fused into one pass over memory."""

from __future__ import annotations

from typing import Literal

import torch

from ..schedule import NoiseSchedule
from . import _checks, _library, prepared

PredictionType = Literal["epsilon", "sample", "v_prediction"]


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    schedule: NoiseSchedule,
    prev_t: torch.Tensor | int | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | Literal["philox", "none"] | None = None,
    generator: torch.Generator | None = None,
    prediction_type: PredictionType = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    *,
    final_alpha_cumprod: float = 1.0,
    use_clipped_model_output: bool = False,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
    diffusers_beta: bool = False,
    return_pred_original: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x_{prev} from x_t and the model's output, exactly as diffusers' DDIMScheduler.step.

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (Song et al. eq. 12) with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)); eta = 0 is deterministic
    DDIM, eta = 1 the DDPM posterior variance. Where 1 - abar_prev - sigma^2 rounds below zero (eta > 1)
    it is taken as 0 (diffusers would give NaN).

    Args:
        sample: x_t, (B, ...), float32/float16/bfloat16, any strides.
        model_output: the model's prediction, same shape/dtype/device.
        t: per-sample timesteps (int64 (B,), or an int for all), in [0, T).
        schedule: the :class:`~fastddpm.NoiseSchedule` (its ``alphas_cumprod`` table).
        prev_t: the timestep stepped to; default t - 1. Any prev_t < 0 is the end, where abar_prev =
            ``final_alpha_cumprod``, as diffusers reads it (50 of 1000 steps: t = 0 steps to -20).
        eta: the DDIM eta (>= 0). Noise is drawn and added only when eta > 0.
        noise: z. A tensor; None to draw ``torch.randn(sample.shape, generator=generator)`` as diffusers;
            "philox" for in-kernel noise from ``seed`` and ``offset`` (as ddpm_step; ``offset`` may be a
            0-d int64 tensor on the sample's device, read inside the kernel); "none".
        generator: the torch.Generator for noise=None (taken, unused, with "none"; refused with a noise tensor
            or "philox", which would ignore it).
        prediction_type: "epsilon", "sample" or "v_prediction".
        clip_sample, clip_sample_range: clip the predicted x0.
        final_alpha_cumprod: abar at prev_t = -1 (diffusers' set_alpha_to_one: 1.0, else abar_0).
        use_clipped_model_output: recompute eps from the clipped x0 for the direction to x_t (diffusers'
            option; DDIM's own pairing of x0 and eps, fastddpm.sample's default).
        diffusers_beta: evaluate 1 - abar_t / abar_prev (in sigma) as diffusers does in fp32, whose
            cancellation is off by up to ~5e-4 (relative) where it is ~1e-4, to return diffusers' own numbers
            (the DDIMScheduler drop-in); default the exact form (abar_prev - abar_t) / abar_prev.
        return_pred_original: also return the predicted x0.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
    """
    _checks.check_step(sample, model_output, schedule, prediction_type, clip_sample, clip_sample_range)
    eta = _checks.check_eta(eta)
    final_alpha_cumprod = _checks.check_number(final_alpha_cumprod, "final_alpha_cumprod", "a number in (0, 1]")
    if not 0 < final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod: expected a value in (0, 1], got {final_alpha_cumprod}")
    tt, pt = _checks.step_timesteps(t, prev_t, sample.shape[0], sample.device, schedule.num_train_timesteps)
    _checks.check_noise(noise, seed, offset, sample, generator)

    step = prepared.cached_step("ddim_step", schedule, sample.device, sample.dtype, backend)
    prev, pred = step(
        sample, model_output, tt, pt, eta=eta, noise=noise, generator=generator, prediction_type=prediction_type,
        clip_sample=clip_sample, clip_sample_range=clip_sample_range, final_alpha_cumprod=final_alpha_cumprod,
        use_clipped_model_output=use_clipped_model_output, seed=seed, offset=offset, diffusers_beta=diffusers_beta,
        return_pred_original=return_pred_original,
    )
    return (prev, pred) if return_pred_original else prev


# The C++ op's fake (schema in csrc/ops.cpp).
if _library.has_c():

    @torch.library.register_fake("fastddpm::ddim_step")
    def _ddim_step_fake(sample, model_output, t, prev_t, ac, final_ac, noise, seed, offset, noise_mode,
                        prediction_type, eta, clip_range, use_clipped, return_pred, offset_tensor=None,
                        diffusers_beta=False):
        return prepared.step_fake(sample, return_pred)

__all__ = ["ddim_step"]
