"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2): the multistep second-order solver of the diffusion ODE in data prediction, as
diffusers' DPMSolverMultistepScheduler with its defaults (algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace").

Each step is one fused op (:func:`fastddpm.ops.dpmpp_step`); the solver's state between steps is the
previous x0 prediction and its timestep. ``fastddpm.sample(..., sampler="dpm++2m")`` runs the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops

__all__ = ["dpmpp_timesteps", "DPMSolverState"]


def dpmpp_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The ``steps`` timesteps diffusers' DPMSolverMultistepScheduler visits (timestep_spacing="linspace"),
    descending: round(linspace(0, T - 1, steps + 1)) without its 0. The last step goes from the smallest of
    them to sigma = 0."""
    T = int(num_train_timesteps)
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()
    if len(set(ts)) != len(ts):
        raise ValueError(
            f"steps: {steps} linspace-spaced steps of {T} training timesteps repeat a timestep, which DPM-Solver++ "
            "cannot step over (h = 0); use fewer steps"
        )
    return ts


@dataclass
class DPMSolverState:
    """What DPM-Solver++(2M) carries from one step to the next: the previous x0 prediction and its timestep,
    and the prepared dpmpp_step op it steps with (``fastddpm.ops.prepare_step("dpmpp_step", ...)``)."""

    op: ops.PreparedStep
    prev_x0: torch.Tensor | None = None
    last_t: int | None = None

    def step(self, x: torch.Tensor, model_output: torch.Tensor, t: int, prev_t: int, *,
             prediction_type: str = "epsilon", clip_sample: bool = False) -> torch.Tensor:
        """x at ``prev_t`` (< 0: the end) from x at ``t`` (timesteps of a checked plan, descending):
        first order at the first step and at the last (as diffusers' lower_order_final with
        final_sigmas_type="zero"), second order between."""
        final = prev_t < 0
        second = self.prev_x0 is not None and not final
        ops.check_like(model_output, x, "model_output", "sample")
        x_prev, x0 = self.op(x, model_output, t, prev_t, prev_x0=self.prev_x0 if second else None,
                             last_t=self.last_t if second else None, prediction_type=prediction_type,
                             clip_sample=clip_sample, return_pred_original=not final)
        if final:
            self.prev_x0, self.last_t = None, None
        else:
            self.prev_x0, self.last_t = x0, t
        return x_prev
