"""fastddpm: denoising diffusion probabilistic models on fused kernels."""

from . import ops
from ._version import __version__
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "__version__", "ops"]
