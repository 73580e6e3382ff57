"""fastddpm.DDIMScheduler: a drop-in for diffusers.DDIMScheduler on the fused ddim_step op.

DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
sigma = eta sqrt(beta~_t). diffusers steps from t to t - T // num_inference_steps whatever the spacing;
this class does the same (arithmetic on the timestep, no table, no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ._common import (  # noqa: F401 (SchedulerMixin: diffusers' loader looks it up in this module)
    BaseOutput,
    FastddpmSchedulerMixin,
    SchedulerMixin,
    as_timestep,
    check_steppable,
    host_timestep,
    invalid_timestep_error,
    randn_like_diffusers,
    register_to_config,
    spaced_timesteps,
    step_output_init,
    threshold_sample,
    whole_timesteps,
)

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(init=False)
class DDIMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDIMScheduler.step`: ``prev_sample`` and ``pred_original_sample`` (diffusers'
    BaseOutput, or a standalone copy of its behaviour without diffusers)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    __init__ = step_output_init


class DDIMScheduler(FastddpmSchedulerMixin):
    """Denoising diffusion implicit models (Song et al. 2021), diffusers-compatible.

    The same arguments, defaults and results as diffusers' DDIMScheduler (within float32 rounding; the
    tables are diffusers' float32 tables). Differences, deliberate: ``backend`` (keyword, not in the
    config); invalid prediction types are rejected at construction; where 1 - abar_prev - sigma^2 rounds
    below zero (eta > 1) it is taken as 0 where diffusers gives NaN; with ``thresholding`` the step runs
    unfused in torch (the quantile needs a sort, and DDIM's eps must stay the unthresholded one); betas
    above 1 are accepted as diffusers accepts them, and a step where alphas_cumprod is negative (NaN in
    diffusers) raises, naming the config. Where diffusers imports, this is a diffusers
    ``SchedulerMixin``/``ConfigMixin`` (save/load, compatibles, from_config are diffusers' own).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        self._check_config(prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr, BETA_SCHEDULES, backend)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(
            np.arange(0, int(num_train_timesteps))[::-1].copy().astype(np.int64)
        )

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDIM does not scale the model input (kept for interchangeability)."""
        return sample

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        ab_t = self.alphas_cumprod[timestep]
        ab_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps spaced by ``config.timestep_spacing``, descending."""
        T = self.config.num_train_timesteps
        ts = spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(ts).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """x_prev from x_t (``sample``) and the model's output at ``timestep``, one fused pass.

        Noise (drawn from ``generator`` as diffusers draws it, or ``variance_noise``) is added when eta > 0.
        ``use_clipped_model_output`` is False by default, as in diffusers, so that the numbers are diffusers';
        with ``clip_sample`` (or thresholding), True gives the better images: eps is recomputed from the clipped
        x0 (DDIM's own pairing, fastddpm.sample's default), where the model's eps with a clipped x0 drifts off
        DDIM's path and images get worse as the number of steps grows.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                "scheduler"
            )
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample: expected a torch.Tensor, got {type(sample).__name__}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output: expected a torch.Tensor, got {type(model_output).__name__}")
        model_output, sample, noise_dtype = self._step_operands(model_output, sample)
        eta = ops.check_eta(eta)
        cfg = self.config
        T = cfg.num_train_timesteps
        stride = T // self.num_inference_steps  # >= 1: set_timesteps takes at most T steps
        timestep = as_timestep(timestep)
        t_host = host_timestep(timestep)
        if t_host is not None:
            if not 0 <= t_host < T:
                raise IndexError(f"timestep: {t_host} is outside [0, {T}) (num_train_timesteps={T})")
            t = t_host
            if t >= self._first_invalid:
                raise invalid_timestep_error(t, self)
        else:
            t = whole_timesteps(timestep, "timestep").to(device=sample.device, dtype=torch.int64).reshape(-1)
            if t.numel() == 1:
                t = t.expand(sample.shape[0])
            check_steppable(t, self)
        final = float(self.final_alpha_cumprod)

        noise, gen, prev_dtype = "none", None, sample.dtype
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either "
                    "`generator` or `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                if not isinstance(variance_noise, torch.Tensor):
                    raise TypeError(f"variance_noise: expected a torch.Tensor, got {type(variance_noise).__name__}")
                if variance_noise.shape != sample.shape:  # diffusers' arithmetic broadcasts it against sample
                    try:
                        variance_noise = variance_noise.expand(sample.shape)
                    except RuntimeError:
                        raise ValueError(f"variance_noise: expected shape {tuple(sample.shape)} or one that "
                                         f"broadcasts to it, got {tuple(variance_noise.shape)}") from None
                noise = variance_noise.to(sample.dtype)
                # diffusers adds std_dev_t * variance_noise to the step in its promoted dtype: a float64 noise
                # makes a float64 prev_sample of a float32 sample (the step itself stays in sample's dtype)
                prev_dtype = torch.promote_types(sample.dtype, variance_noise.dtype)
            elif isinstance(generator, (list, tuple)) or noise_dtype != sample.dtype:
                noise = randn_like_diffusers(sample.shape, generator, sample.device, noise_dtype).to(sample.dtype)
            else:
                noise, gen = None, generator

        if cfg.thresholding:
            # prev_t below 0 at the last step (-20 for 50 of 1000), as diffusers
            prev, pred = self._step_thresholded(
                model_output, t, t - stride, sample, eta, use_clipped_model_output, noise, gen, final
            )
        else:
            prev, pred = self._step_fused(model_output, t, t - stride, sample, eta, use_clipped_model_output,
                                          noise, gen, final)
        if prev_dtype != prev.dtype:
            prev = prev.to(prev_dtype)
        if not return_dict:
            return prev, pred
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def _step_fused(self, m, t, prev_t, x, eta, use_clipped, noise, gen, final):
        # The checks of fastddpm.ops.ddim_step that the scheduler's own do not cover, then its prepared step.
        step = self._prepared_step("ddim_step", x)  # also checks x's dtype and rank
        ops.check_like(m, x, "model_output", "sample")
        if not 0 < final <= 1:
            raise ValueError(f"final_alpha_cumprod: expected a value in (0, 1], got {final}")
        if isinstance(t, torch.Tensor):
            t = ops.check_timesteps(t, x.shape[0], x.device, self.config.num_train_timesteps)  # prev_t = t - stride
        if isinstance(noise, torch.Tensor):
            ops.check_like(noise, x, "noise", "sample")
        cfg = self.config
        return step(
            x,
            m,
            t,
            prev_t,
            eta=eta,
            noise=noise,
            generator=gen,
            prediction_type=cfg.prediction_type,
            clip_sample=bool(cfg.clip_sample),
            clip_sample_range=float(cfg.clip_sample_range),
            final_alpha_cumprod=final,
            use_clipped_model_output=use_clipped,
            return_pred_original=True,
            diffusers_beta=True,  # sigma from diffusers' float32 1 - abar_t / abar_prev, as DDPMScheduler
        )

    def _step_thresholded(self, m, t, prev_t, x, eta, use_clipped, noise, gen, final):
        # Unfused: diffusers' formulas on our tables with the thresholded x0.
        cfg = self.config
        shape = (-1, *([1] * (x.dim() - 1)))
        ac = self.schedule.tables(x.device)["alphas_cumprod"]
        tt = torch.as_tensor(t, device=x.device).reshape(-1)
        pt = torch.as_tensor(prev_t, device=x.device).reshape(-1)
        ab_t = ac[tt].reshape(shape)
        ab_prev = torch.where(pt >= 0, ac[pt.clamp(min=0)], torch.tensor(final, device=x.device)).reshape(
            shape
        )
        if x.dtype == torch.float64:
            ab_t, ab_prev = ab_t.double(), ab_prev.double()
        bp = 1 - ab_t
        if cfg.prediction_type == "epsilon":
            x0, eps = (x - bp**0.5 * m) / ab_t**0.5, m
        elif cfg.prediction_type == "sample":
            x0 = m
            eps = (x - ab_t**0.5 * x0) / bp**0.5
        else:
            x0 = ab_t**0.5 * x - bp**0.5 * m
            eps = ab_t**0.5 * m + bp**0.5 * x
        x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        std = eta * ((1 - ab_prev) / bp * (1 - ab_t / ab_prev)) ** 0.5
        if use_clipped:
            eps = (x - ab_t**0.5 * x0) / bp**0.5
        prev = ab_prev**0.5 * x0 + (1 - ab_prev - std**2).clamp(min=0) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                gd = gen.device if gen is not None else x.device
                noise = torch.randn(x.shape, generator=gen, device=gd, dtype=x.dtype).to(x.device)
            prev = prev + std * noise
        return prev.to(x.dtype), x0.to(x.dtype)  # both in the sample's dtype, as diffusers returns them
