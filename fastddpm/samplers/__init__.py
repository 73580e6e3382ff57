"""Samplers: diffusers-compatible schedulers on the fused step ops, and fastddpm.sample."""

from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput", "DDPMScheduler", "DDPMSchedulerOutput"]
