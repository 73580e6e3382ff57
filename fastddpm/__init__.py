"""fastddpm: denoising diffusion probabilistic models on fused kernels."""

from . import ops
from ._version import __version__
from .compat.diffusers import patch, unpatch
from .models import UNet, UNetConfig
from .samplers import sample
from .schedule import NoiseSchedule

__all__ = [
    "DDIMScheduler",
    "DDPMPipeline",
    "DDPMScheduler",
    "NoiseSchedule", "UNet", "UNetConfig", "__version__", "ops", "patch", "sample", "unpatch",
]


_LAZY = ("DDIMScheduler", "DDPMPipeline", "DDPMScheduler")  # imported on first use (fastddpm/samplers)


def __getattr__(name: str):
    if name in _LAZY:
        from . import samplers

        value = getattr(samplers, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
