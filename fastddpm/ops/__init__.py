"""The fused ops of fastddpm, each with a backend argument.

Every function takes ``backend="auto"|"cpu"|"cuda"|"triton"|"torch"``; see
:mod:`fastddpm.ops._dispatch` for how ``auto`` chooses. ``reference`` holds the
plain-torch float64-correct versions.
"""

from . import reference
from ._dispatch import BACKENDS, BackendNotSupported, available_backends
from .attention import attention
from .ddim_step import ddim_step
from .ddpm_step import ddpm_step, philox_randn
from .dpmpp_step import dpmpp_step
from .group_norm_silu import group_norm_silu
from .q_sample import q_sample

__all__ = [
    "BACKENDS",
    "BackendNotSupported",
    "attention",
    "available_backends",
    "ddim_step",
    "ddpm_step",
    "dpmpp_step",
    "group_norm_silu",
    "philox_randn",
    "q_sample",
    "reference",
]
