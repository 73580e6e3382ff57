"""fastddpm: denoising diffusion probabilistic models on fused kernels."""

from . import ops
from ._version import __version__
from .compat.diffusers import patch, unpatch
from .models import UNet, UNetConfig
from .samplers import DDIMScheduler, DDPMPipeline, DDPMScheduler, sample
from .schedule import NoiseSchedule

__all__ = [
    "DDIMScheduler",
    "DDPMPipeline",
    "DDPMScheduler",
    "NoiseSchedule", "UNet", "UNetConfig", "__version__", "ops", "patch", "sample", "unpatch",
]
