"""GroupNormSiLU: torch.nn.GroupNorm followed by SiLU as one fused module."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..ops import check_backend, check_number
from ..ops.group_norm_silu import group_norm_silu


def check_module_int(value, name: str) -> int:
    """A positive int constructor argument (a float such as 2.0, or a bool, is refused naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


class GroupNormSiLU(nn.Module):
    """silu(GroupNorm(x)) (or GroupNorm alone with ``activation=None``) through the fused op.

    Parameters, buffers and state_dict keys (``weight``, ``bias``) are those of
    :class:`torch.nn.GroupNorm`, so a checkpoint loads either way, and with
    ``activation=None`` the module is a drop-in GroupNorm.

    Args:
        num_groups: groups to split the channels into (must divide ``num_channels``).
        num_channels: C of the (N, C, *spatial) input.
        eps: added to the variance.
        affine: learn a per-channel weight (ones) and bias (zeros).
        activation: "silu" or None.
        backend: the op's backend ("auto", "cpu", "cuda", "triton", "torch").
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu", device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        num_groups = check_module_int(num_groups, "num_groups")
        num_channels = check_module_int(num_channels, "num_channels")
        eps = check_number(eps, "eps", "a non-negative number")
        if not 0 <= eps < float("inf"):  # 0 as torch.nn.GroupNorm takes it
            raise ValueError(f"eps: expected a finite non-negative number, got {eps}")
        if not isinstance(affine, bool):
            raise TypeError(f"affine: expected True or False, got {affine!r}")
        check_backend(backend)
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_groups: num_channels={num_channels} must be divisible by num_groups={num_groups}"
            )
        if activation not in ("silu", None):
            raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: str | None = "silu") -> GroupNormSiLU:
        """A GroupNormSiLU with ``gn``'s settings, sharing its parameters."""
        m = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, activation,
                device=gn.weight.device if gn.affine else None)
        if gn.affine:
            m.weight, m.bias = gn.weight, gn.bias
        return m

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, *spatial). shift: optional (N, C), added to x per sample and channel before the
        normalisation (the ResNet block's time-embedding add, fused)."""
        if not isinstance(x, torch.Tensor):  # (an AttributeError on .dim before)
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(f"x: expected {self.num_channels} channels (dim 1), got shape {tuple(x.shape)}")
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                               backend=self.backend, shift=shift)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}")


__all__ = ["GroupNormSiLU"]
