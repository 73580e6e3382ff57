"""Samplers: diffusers-compatible schedulers on the fused step ops, and fastddpm.sample."""

from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput
from .pipeline import DDPMPipeline, ImagePipelineOutput
from .sample import sample

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "DDPMPipeline",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "ImagePipelineOutput",
    "sample",
]
