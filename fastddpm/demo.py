"""The forward-diffusion demo: one image diffused to several t, side by side."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import ops
from ._io import save_image
from .schedule import NoiseSchedule


def demo_image(image_size: int = 32) -> torch.Tensor:
    """A real image in [-1, 1], (1, 1, S, S): a handwritten digit from scikit-learn, or a pattern without it."""
    try:
        from sklearn.datasets import load_digits

        img = torch.from_numpy(load_digits().images[0].astype(np.float32) / 16.0)[None, None]  # (1, 1, 8, 8)
    except ImportError:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        img = ((xx**2 + yy**2) < 0.6).float()[None, None]
    img = torch.nn.functional.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return img.clamp(0, 1) * 2 - 1


PAD = 2  # pixels between the strip's images


def strip_size(n: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG strip of ``n`` images (each scaled up to at least 128 pixels)."""
    scale = max(1, 128 // image_size)
    return (n * (image_size + PAD) - PAD) * scale, image_size * scale


def forward_strip(path: str, timesteps: list[int], image_size: int = 32, seed: int = 0, backend: str = "auto") -> str:
    """Write a PNG strip of x_t = q_sample(x0, t) for each t; returns the path."""
    from PIL import Image

    sched = NoiseSchedule()
    x0 = demo_image(image_size).expand(len(timesteps), -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor(timesteps, dtype=torch.int64)
    xt = ops.q_sample(x0, t, noise, sched, backend=backend)  # (n, 1, S, S)
    imgs = ((xt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    strip = np.full((image_size, len(timesteps) * (image_size + PAD) - PAD), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        strip[:, i * (image_size + PAD) : i * (image_size + PAD) + image_size] = im
    out = Image.fromarray(strip).resize(strip_size(len(timesteps), image_size), Image.NEAREST)
    save_image(out, path)
    return os.path.abspath(path)
