"""Samplers: diffusers-compatible schedulers on the fused step ops, and fastddpm.sample."""

from .ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]
