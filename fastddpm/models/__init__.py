"""Networks: the DDPM U-Net."""

from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
