"""fastddpm.DDPMScheduler: a drop-in for diffusers.DDPMScheduler whose step is one fused kernel.

The numbered steps of diffusers' ``step`` (predicted x0, clip, posterior mean,
sigma_t z; Ho et al. 2020 eqs. 6, 7, 15) all run inside
:func:`fastddpm.ops.ddpm_step`. What stays in Python is bookkeeping that costs
no device work: the successor of each timestep comes from a table indexed by
timestep, built once in ``set_timesteps`` (diffusers searches
``self.timesteps == t`` on every step), and ``t`` is read on the host only when
it already lives there (an int or a CPU tensor), so a CUDA timestep never
forces a synchronisation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ._common import (  # noqa: F401 (SchedulerMixin: diffusers' loader looks it up in this module)
    BaseOutput,
    FastddpmSchedulerMixin,
    SchedulerMixin,
    as_timestep,
    check_steppable,
    host_timestep,
    invalid_timestep_error,
    prev_table,
    randn_like_diffusers,
    register_to_config,
    spaced_timesteps,
    step_output_init,
    threshold_sample,
    whole_timesteps,
)

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]

VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")


@dataclass(init=False)
class DDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMScheduler.step`: ``prev_sample`` (x_{t-1}) and ``pred_original_sample`` (x0).

    diffusers' BaseOutput (a standalone copy of its behaviour without diffusers): attributes, ``out[0]``,
    ``out["prev_sample"]``, keys/values/items and ``to_tuple()``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    __init__ = step_output_init


class _TimestepTables:
    """The timestep -> previous timestep table on the host and, lazily, per device."""

    def _set_prev_table(self, table: np.ndarray) -> None:
        self._prev_np = table
        self._prev_dev: dict[torch.device, torch.Tensor] = {}

    def _prev_on(self, device: torch.device) -> torch.Tensor:
        t = self._prev_dev.get(device)
        if t is None:
            t = torch.from_numpy(self._prev_np).to(device)
            self._prev_dev[device] = t
        return t

    def _resolve_timestep(self, timestep, sample: torch.Tensor):
        """(t, prev_t, t_host) for the fused op; t_host is the int timestep when known on the host."""
        T = self.config["num_train_timesteps"]
        timestep = as_timestep(timestep)
        t_host = host_timestep(timestep)
        if t_host is not None:
            if not 0 <= t_host < T:
                raise IndexError(f"timestep: {t_host} is outside [0, {T}) (num_train_timesteps={T})")
            prev = int(self._prev_np[t_host])
            if prev == -2:
                raise IndexError(
                    f"timestep: {t_host} is not one of the scheduler's timesteps (set by set_timesteps); "
                    f"expected one of {self.timesteps.tolist()[:8]}"
                    f"{' ...' if len(self.timesteps) > 8 else ''}"
                )
            if t_host >= self._first_invalid or prev >= self._first_invalid:
                raise invalid_timestep_error(t_host if t_host >= self._first_invalid else prev, self)
            return t_host, prev, t_host
        # A tensor on the device (0-d, or one timestep per sample): one gather, no synchronisation.
        tt = whole_timesteps(timestep, "timestep").to(device=sample.device, dtype=torch.int64).reshape(-1)
        B = sample.shape[0]
        if tt.numel() == 1:
            tt = tt.expand(B)
        elif tt.numel() != B:
            raise ValueError(
                f"timestep: expected one timestep or one per sample ({B}), got shape {tuple(timestep.shape)}"
            )
        tt = tt.contiguous()
        pt = self._prev_on(sample.device)[tt.clamp(0, T - 1)]
        if tt.is_cpu:
            if bool(((tt < 0) | (tt >= T) | (pt == -2)).any()):
                bad = tt[(tt < 0) | (tt >= T) | (pt == -2)][0].item()
                raise IndexError(f"timestep: {bad} is not one of the scheduler's timesteps in [0, {T})")
        elif not torch.compiler.is_compiling():
            torch._assert_async(
                ((tt >= 0) & (tt < T) & (pt >= -1)).all(), "timestep: not one of the scheduler's timesteps"
            )
        check_steppable(tt, self, pt)
        return tt, pt, None


class DDPMScheduler(_TimestepTables, FastddpmSchedulerMixin):
    """Denoising diffusion probabilistic models (Ho et al. 2020), diffusers-compatible.

    Takes diffusers' DDPMScheduler arguments with the same defaults and meaning,
    and returns what diffusers returns within float32 rounding (the tables are
    diffusers' own float32 tables; see fastddpm/samplers/_common.py). Where
    diffusers imports, this is a diffusers ``SchedulerMixin``/``ConfigMixin``:
    save_pretrained/from_pretrained, pipelines' model_index.json, ``compatibles``
    and ``from_config`` are diffusers' own.

    Differences from diffusers, all deliberate:

    * ``backend`` (keyword, not part of the config) picks the fused op's backend.
    * An unknown prediction_type is rejected when the scheduler is built, not at
      the first step. Custom timesteps must be non-negative.
      ``variance_type="fixed_large_log"`` is accepted in the config (diffusers has
      it) but step raises: diffusers computes sqrt(log beta_t), which is NaN. An
      unknown variance_type steps as fixed_small, as in diffusers, with a warning.
    * Betas above 1 are accepted as diffusers accepts them; a step at a timestep
      whose alphas_cumprod is negative (NaN in diffusers) raises, naming the config.
    * With a timestep tensor on a CUDA device, t is not read on the host, so the
      noise of the final step (t = 0, where no noise is added) is still drawn from
      ``generator``; the result is the same, the generator ends one draw further.
    * With ``thresholding``, the per-sample quantile (a sort) runs in torch and
      the fused step takes the thresholded x0 (as prediction_type="sample").
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        if variance_type not in VARIANCE_TYPES:
            warnings.warn(
                f"variance_type: {variance_type!r} is not one of {', '.join(VARIANCE_TYPES)}; stepping with "
                "'fixed_small', as diffusers does",
                stacklevel=3,
            )
        self._check_config(prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr, BETA_SCHEDULES, backend)
        self.one = torch.tensor(1.0)
        self._custom_timesteps = False
        T = int(num_train_timesteps)
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy())  # the setter builds the t - 1 table
        self.variance_type = variance_type

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM does not scale the model input (kept for interchangeability)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps of sampling: ``num_inference_steps`` spaced by
        ``config.timestep_spacing``, or explicit descending ``timesteps``."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if ts.ndim != 1 or ts.size == 0:
                raise ValueError(
                    f"timesteps: expected a non-empty 1-D list of integers, got shape {ts.shape}"
                )
            if not np.issubdtype(ts.dtype, np.integer):
                bad = ts[~(np.isfinite(ts) & (ts == np.round(ts)))] if ts.dtype.kind in "fc" else ts[:1]
                if bad.size:  # (inf was cast to int64's minimum and refused as a negative timestep)
                    raise ValueError(f"timesteps: expected integers, got {bad[0].item()!r}")
            ts = ts.astype(np.int64)
            for i in range(1, len(ts)):
                if ts[i] >= ts[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if ts[-1] < 0:
                raise ValueError(f"timesteps: expected non-negative timesteps, got {int(ts[-1])}")
            self._custom_timesteps = True  # num_inference_steps is left as it was, as diffusers leaves it
        else:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps: pass num_inference_steps or timesteps")
            ts = spaced_timesteps(
                T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset
            )
            if ts.max() >= T or ts.min() < 0:
                raise ValueError(
                    f"steps_offset: timesteps {ts.tolist()[:4]}... fall outside [0, {T}) with "
                    f"steps_offset={self.config.steps_offset}"
                )
            self._num_inference_steps = int(num_inference_steps)
            self._custom_timesteps = False
        self._timesteps = torch.from_numpy(ts).to(device)  # the table from the host copy, not read back
        self._set_prev_table(prev_table(ts, T))
        if device is not None:
            self._prev_on(torch.device(device))

    # diffusers' previous_timestep (and so its step) goes to the successor in ``timesteps`` when
    # custom_timesteps or num_inference_steps is set, else to t - 1, reading the three attributes at each step.
    # The successor table is rebuilt whenever one of them is assigned, so that code setting them by hand, in any
    # order, steps as diffusers does.
    @property
    def num_inference_steps(self):
        return self._num_inference_steps

    @num_inference_steps.setter
    def num_inference_steps(self, value) -> None:
        self._num_inference_steps = value
        self._follow_timesteps()

    @property
    def custom_timesteps(self) -> bool:
        return self._custom_timesteps

    @custom_timesteps.setter
    def custom_timesteps(self, value) -> None:
        self._custom_timesteps = value
        self._follow_timesteps()

    def __setstate__(self, state: dict) -> None:
        # a scheduler pickled before these two became properties holds them under their public names
        for name in ("num_inference_steps", "custom_timesteps"):
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)

    def _follow_timesteps(self) -> None:
        if "_timesteps" not in self.__dict__:  # during __init__
            return
        T = int(self.config["num_train_timesteps"])
        if self.custom_timesteps or self.num_inference_steps:
            self._set_prev_table(prev_table(self._timesteps.cpu().numpy(), T))
        else:
            self._set_prev_table(np.arange(T, dtype=np.int64) - 1)

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps of sampling, in order.

        After ``set_timesteps``, assigning a new tensor makes each step go to its successor in it (-1 after the
        last), as diffusers' ``previous_timestep`` reads ``self.timesteps``; before it, a step goes to t - 1 in
        both. Editing the tensor in place is not seen."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value) -> None:
        ts = torch.as_tensor(value)
        if ts.dim() != 1 or ts.dtype.is_complex or ts.dtype == torch.bool:
            raise ValueError(f"timesteps: expected a 1-D tensor of timesteps, got {ts.dtype} of shape "
                             f"{tuple(ts.shape)}")
        self._timesteps = ts
        self._follow_timesteps()

    def previous_timestep(self, timestep):
        """The timestep that ``step`` moves to from ``timestep`` (-1 after the last)."""
        if self.custom_timesteps or self.num_inference_steps:
            timestep = as_timestep(timestep)
            t = host_timestep(timestep)
            if t is None:
                return self._prev_on(timestep.device)[timestep.long()]
            if not 0 <= t < len(self._prev_np) or self._prev_np[t] == -2:
                raise IndexError(f"timestep: {t} is not one of the scheduler's timesteps")
            return torch.tensor(int(self._prev_np[t]))
        return timestep - 1

    def _get_variance(self, t, predicted_variance=None, variance_type=None) -> torch.Tensor:
        """sigma_t^2 of the step from ``t`` (diffusers' helper, Ho et al. eqs. 6-7; for "learned_range"
        Nichol & Dhariwal eq. 15 as a log-variance interpolation), from the float32 tables.

        ``step`` does not call this: the fused op forms the same variance inline.
        """
        prev_t = int(self.previous_timestep(t))
        t = int(t)
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - ab_t / ab_prev
        posterior = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)  # log is taken below
        vt = self.config.variance_type if variance_type is None else variance_type
        if vt == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior))
        if vt == "fixed_large":
            return beta_t
        if vt == "fixed_large_log":
            return torch.log(beta_t)
        if vt == "learned":
            return predicted_variance
        if vt == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(posterior)
        return posterior  # fixed_small, and (as diffusers) any unknown name

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
    ):
        """x_{t-1} from x_t (``sample``) and the model's output at ``timestep``.

        One fused pass: predicted x0 (eq. 15), clip, posterior mean (eq. 7), plus
        sigma_t z for t > 0 with z drawn from ``generator`` exactly as diffusers
        draws it (a list of generators, one per sample, works as in diffusers).

        Returns:
            :class:`DDPMSchedulerOutput`, or the tuple (prev_sample, pred_original_sample).
        """
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample: expected a torch.Tensor, got {type(sample).__name__}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output: expected a torch.Tensor, got {type(model_output).__name__}")
        vt = self.config["variance_type"]  # read at each step, as diffusers reads it (register_to_config changes it)
        if vt not in VARIANCE_TYPES:
            vt = "fixed_small"  # as diffusers steps an unknown name (the constructor warned)
        predicted_variance = None
        if vt in ("learned", "learned_range"):
            C = sample.shape[1] if sample.dim() > 1 else -1
            if model_output.dim() != sample.dim() or model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"model_output: variance_type={vt!r} needs the model's variance too: expected "
                    f"{2 * C} channels (2 x those of sample), got shape {tuple(model_output.shape)}"
                )
            model_output, predicted_variance = torch.split(model_output, C, dim=1)
        elif vt == "fixed_large_log":
            raise NotImplementedError(
                "variance_type='fixed_large_log': diffusers' step computes sqrt(log beta_t), which is NaN; "
                "use 'fixed_large'"
            )
        model_output, sample, noise_dtype = self._step_operands(model_output, sample)
        if predicted_variance is not None:
            predicted_variance = predicted_variance.to(sample.dtype)
        step = self._prepared_step("ddpm_step", sample)  # also checks sample's dtype and rank
        t, prev_t, t_host = self._resolve_timestep(timestep, sample)

        cfg = self.config  # read by key: attribute access goes through a failed lookup first
        prediction_type = cfg["prediction_type"]
        thresholding = cfg["thresholding"]
        if thresholding:
            # diffusers' formulas for x0, then the per-sample quantile in torch.
            ac = self.schedule.tables(sample.device)["alphas_cumprod"]
            ab = ac[t] if t_host is not None else ac[t].reshape(-1, *([1] * (sample.dim() - 1)))
            ab = ab.to(sample.dtype) if sample.dtype == torch.float64 else ab
            if prediction_type == "epsilon":
                x0 = (sample - (1 - ab) ** 0.5 * model_output) / ab**0.5
            elif prediction_type == "sample":
                x0 = model_output
            else:
                x0 = ab**0.5 * sample - (1 - ab) ** 0.5 * model_output
            model_output = threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
            prediction_type = "sample"

        noise = None  # drawn from generator by the step, as diffusers draws it
        if t_host == 0 or (t_host is None and t.is_cpu and not bool((t > 0).any())):
            noise = "none"  # diffusers draws no noise at t = 0
        elif isinstance(generator, (list, tuple)) or noise_dtype != sample.dtype:
            noise = randn_like_diffusers(sample.shape, generator, sample.device, noise_dtype).to(sample.dtype)
            generator = None
        prev, pred = step(
            sample,
            model_output,
            t,
            prev_t,
            noise=noise,
            generator=generator,
            prediction_type=prediction_type,
            # diffusers' fixed_small_log is the same sigma, sqrt of the posterior variance (through exp/log)
            variance_type="fixed_small" if vt == "fixed_small_log" else vt,
            clip_sample=bool(cfg["clip_sample"]) and not thresholding,
            clip_sample_range=float(cfg["clip_sample_range"]),
            predicted_variance=predicted_variance,
            # diffusers' float32 rounding of beta_t = 1 - abar_t / abar_prev, not the op's exact
            # (abar_prev - abar_t) / abar_prev: diffusers' own pinned whole-loop numbers need it
            # (tests/test_diffusers_scheduler_suite.py::test_ddpm_noised_loop_exact_op_is_float64)
            diffusers_beta=True,
            return_pred_original=True,
        )
        if not return_dict:
            return prev, pred
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)


