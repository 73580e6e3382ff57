"""Samplers: diffusers-compatible schedulers on the fused step ops, and fastddpm.sample.

The schedulers and the pipeline are imported on first use: where diffusers is installed they are
diffusers SchedulerMixin/ConfigMixin subclasses, and importing diffusers costs about two seconds that
``fastddpm.sample`` and the command line do not need.
"""

import importlib

from .sample import sample

_LAZY = {
    "DDIMScheduler": "ddim",
    "DDIMSchedulerOutput": "ddim",
    "DDPMScheduler": "ddpm",
    "DDPMSchedulerOutput": "ddpm",
    "DDPMPipeline": "pipeline",
    "ImagePipelineOutput": "pipeline",
}

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "DDPMPipeline",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "ImagePipelineOutput",
    "sample",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
