"""Modules built on the fused ops."""

from .group_norm_silu import GroupNormSiLU

__all__ = ["GroupNormSiLU"]
