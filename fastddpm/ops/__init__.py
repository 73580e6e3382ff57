"""The fused ops of fastddpm, each with a backend argument.

Every function takes ``backend="auto"|"cpu"|"cuda"|"triton"|"torch"``; see
:mod:`fastddpm.ops._dispatch` for how ``auto`` chooses. ``reference`` holds the
plain-torch float64-correct versions.

For callers that step many times with one configuration (the samplers):

* :func:`prepare_step` / :class:`PreparedStep`: a step op (ddpm_step, ddim_step, dpmpp_step) bound once
  to a schedule, device, dtype and resolved backend; calling it runs one step without re-checking.
* :func:`check_tensor`, :func:`check_like`: the ops' tensor checks (errors name the argument);
  :func:`check_eta`: DDIM's eta (a finite number >= 0); :func:`check_number`, :func:`check_shape`,
  :func:`check_device`, :func:`check_generator`: a number (never a string or bool), a shape, a device and
  a torch.Generator (or None) argument; :func:`check_backend`: a backend name ("auto" or one of ``BACKENDS``).
* :func:`check_timesteps`: a timestep argument (int, 0-d or (B,) integer tensor) as a range-checked int64
  (B,) tensor on a device; :func:`int_timesteps`: an already checked int as a cached (B,) tensor.
* :func:`generator_noise`: z drawn from a torch.Generator as diffusers' randn_tensor draws it.
* ``PREDICTION_TYPES``, ``VARIANCE_TYPES``: the names the step ops accept (mapped to their kernels' codes).
"""

from . import reference
from ._checks import (
    check_device,
    check_eta,
    check_generator,
    check_like,
    check_number,
    check_shape,
    check_tensor,
    int_timesteps,
)
from ._checks import timesteps as check_timesteps
from ._codes import PREDICTION_TYPES, VARIANCE_TYPES
from ._dispatch import BACKENDS, BackendNotSupported, available_backends, check_backend
from .attention import attention
from .ddim_step import ddim_step
from .ddpm_step import ddpm_step, philox_randn
from .dpmpp_step import dpmpp_step
from .group_norm_silu import group_norm_silu
from .prepared import PreparedStep, generator_noise, prepare_step
from .q_sample import q_sample

__all__ = [
    "BACKENDS",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "BackendNotSupported",
    "PreparedStep",
    "attention",
    "available_backends",
    "check_backend",
    "check_device",
    "check_eta",
    "check_generator",
    "check_like",
    "check_number",
    "check_shape",
    "check_tensor",
    "check_timesteps",
    "ddim_step",
    "ddpm_step",
    "dpmpp_step",
    "generator_noise",
    "group_norm_silu",
    "int_timesteps",
    "philox_randn",
    "prepare_step",
    "q_sample",
    "reference",
]
