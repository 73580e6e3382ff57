"""fastddpm.DDPMPipeline: a drop-in for diffusers.DDPMPipeline on fastddpm's schedulers.

The same call and output as diffusers' (batch_size, generator, num_inference_steps, output_type
"pil"/"np"/"pt", return_dict); the unet may be a fastddpm UNet or a diffusers UNet2DModel (patched with
fastddpm.patch or not), the scheduler fastddpm's (or diffusers') DDPMScheduler or DDIMScheduler.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import randn_like_diffusers
from .ddpm import DDPMScheduler
from .sample import call_model

__all__ = ["DDPMPipeline", "ImagePipelineOutput"]


class ImagePipelineOutput:
    """``images``: a list of PIL images, a numpy array (B, H, W, C) or a tensor (B, C, H, W)."""

    def __init__(self, images) -> None:
        self.images = images

    def to_tuple(self) -> tuple:
        return (self.images,)

    def __getitem__(self, k):
        return self.images if k in (0, "images") else self.to_tuple()[k]

    def __repr__(self) -> str:
        return f"ImagePipelineOutput(images=<{type(self.images).__name__}>)"


def numpy_to_pil(images: np.ndarray):
    """(B, H, W, C) floats in [0, 1] -> list of PIL images (as diffusers)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


class DDPMPipeline:
    """Unconditional image generation: ``DDPMPipeline(unet, scheduler)(batch_size=16).images``."""

    def __init__(self, unet, scheduler=None) -> None:
        if not callable(unet):
            raise TypeError(f"unet: expected a callable model, got {type(unet).__name__}")
        for name in ("in_channels", "sample_size"):
            if getattr(getattr(unet, "config", None), name, None) is None:
                raise ValueError(
                    f"unet: expected unet.config.{name} (a fastddpm UNet or a diffusers UNet2DModel)"
                )
        self.unet = unet
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self._progress = {}

    # diffusers' pipeline conveniences
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress = kwargs

    def progress_bar(self, iterable):
        from tqdm.auto import tqdm

        return tqdm(iterable, **self._progress)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return p.dtype if p is not None else torch.float32

    def to(self, *args, **kwargs) -> DDPMPipeline:
        if isinstance(self.unet, torch.nn.Module):
            self.unet.to(*args, **kwargs)
        return self

    numpy_to_pil = staticmethod(numpy_to_pil)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        cfg = self.unet.config
        size = cfg.sample_size
        if isinstance(size, int):
            shape = (batch_size, cfg.in_channels, size, size)
        else:
            shape = (batch_size, cfg.in_channels, *size)
        image = randn_like_diffusers(shape, generator, self.device, self.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = call_model(self.unet, image, t)
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
