"""The networks the end-to-end benchmarks run, each as fastddpm, diffusers and denoising-diffusion-pytorch.

* ``cifar10``: the DDPM CIFAR-10 U-Net (35,746,307 parameters, 3x32x32; random weights, seed 0).
* ``digits``: the shipped digits model (686,769 parameters, 1x16x16; its trained weights).
* ``tiny``: UNet.tiny (3x8x8), for the smoke run that proves the suite works.

diffusers gets the same weights (fastddpm.compat.diffusers.to_diffusers). denoising-diffusion-pytorch
(lucidrains) has its own U-Net, so it gets one of matching widths and depth (the same channel widths
per level, its default attention layout: linear attention on every level, full attention in the middle)
with its own random weights; its parameter count and FLOPs are reported beside the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

NETWORKS = ("cifar10", "digits", "tiny")

# denoising-diffusion-pytorch Unet(dim, dim_mults) of the same channel widths per level as ours
_DDP_UNET = {"cifar10": dict(dim=128, dim_mults=(1, 2, 2, 2)),
             "digits": dict(dim=16, dim_mults=(1, 2, 4)),
             "tiny": dict(dim=16, dim_mults=(1, 2))}


@dataclass
class Network:
    name: str
    ours: torch.nn.Module  # fastddpm.UNet
    image_shape: tuple[int, int, int]  # (C, H, W)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.ours.parameters())

    def label(self) -> str:
        return f"{self.name} ({self.params / 1e6:.2f}M)" if self.params >= 1e6 else \
            f"{self.name} ({self.params / 1e3:.0f}k)"


def network(name: str) -> Network:
    """fastddpm's U-Net of that name, in eval mode, dropout 0 (so every provider computes the same)."""
    from .. import UNet

    if name == "cifar10":
        torch.manual_seed(0)
        ours = UNet.ddpm_cifar10(dropout=0.0)
    elif name == "digits":
        from ..pretrained import load_builtin

        ours = load_builtin("digits").model
    elif name == "tiny":
        torch.manual_seed(0)
        ours = UNet.tiny()
    else:
        raise ValueError(f"network: expected one of {', '.join(NETWORKS)}, got {name!r}")
    c = ours.config
    return Network(name, ours.eval(), (c.in_channels, c.sample_size, c.sample_size))


def diffusers_unet(net: Network):
    """diffusers' UNet2DModel with the same weights."""
    from ..compat.diffusers import to_diffusers

    _quiet_diffusers()
    return to_diffusers(net.ours).eval()


def unet_variants(ours: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """fastddpm (NCHW), fastddpm channels_last, diffusers, and diffusers under fastddpm.patch: same weights."""
    from ..compat.diffusers import patch, to_diffusers

    _quiet_diffusers()
    d = to_diffusers(ours)
    cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    return {"fastddpm": ours, "fastddpm-cl": cl, "diffusers": d, "diffusers+patch": patch(copy.deepcopy(d))}


def ddpm_pytorch_status() -> str | None:
    """None if denoising-diffusion-pytorch imports here, else why not (one line)."""
    try:
        import denoising_diffusion_pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (ImportError, or a dependency failing at import)
        return (f"denoising-diffusion-pytorch not importable ({type(exc).__name__}: {str(exc)[:80]}); "
                "pip install denoising-diffusion-pytorch torchvision")
    return None


def ddpm_pytorch_unet(net: Network, seed: int = 0):
    """denoising-diffusion-pytorch's Unet with the same channel widths per level."""
    from denoising_diffusion_pytorch import Unet

    torch.manual_seed(seed)
    return Unet(channels=net.image_shape[0], **_DDP_UNET[net.name]).eval()


def ddpm_pytorch_diffusion(net: Network, unet=None, sampling_steps: int = 1000):
    """GaussianDiffusion with DDPM's settings: linear betas over 1000 steps, epsilon objective.

    Fewer sampling steps than 1000 make it sample with DDIM (eta = 0), its only way to take fewer steps.
    """
    from denoising_diffusion_pytorch import GaussianDiffusion
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddp_mod

    ddp_mod.tqdm = _no_bar  # its sampling loops draw a progress bar per call
    unet = unet if unet is not None else ddpm_pytorch_unet(net)
    return GaussianDiffusion(unet, image_size=net.image_shape[1], timesteps=1000,
                             sampling_timesteps=sampling_steps, objective="pred_noise",
                             beta_schedule="linear")


def _no_bar(iterable, *args, **kwargs):
    return iterable


def _quiet_diffusers() -> None:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its note on float32 modules, at every conversion
