"""Modules built on the fused ops."""

from .attention import AttentionBlock
from .group_norm_silu import GroupNormSiLU

__all__ = ["AttentionBlock", "GroupNormSiLU"]
