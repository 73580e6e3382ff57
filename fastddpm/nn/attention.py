"""The U-Net's self-attention block: x + proj_out(attention(qkv(GroupNorm(x)))).

Parameters convert to and from two layouts:

* diffusers' ``Attention`` as UNet2DModel builds it in its mid block and attention blocks
  (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; residual_connection=True, bias=True,
  upcast_softmax=True), and
* the original DDPM code (Ho et al. 2020, ``attn_block``; PyTorch ports name it ``norm``, ``q``, ``k``,
  ``v``, ``proj_out`` as 1x1 convolutions).

Here the three projections are one (3C, C) matrix, so the block reads its input once for q, k and v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import check_backend, check_number
from ..ops.attention import attention
from .group_norm_silu import GroupNormSiLU, check_module_int

__all__ = ["AttentionBlock"]


def _make_norm(num_groups: int, channels: int, eps: float) -> nn.Module:
    # GroupNorm without activation through the fused op (state_dict keys as nn.GroupNorm: weight, bias).
    return GroupNormSiLU(num_groups, channels, eps, activation=None)


def _as_matrix(w: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    # A Linear weight (C, C) or a 1x1 conv weight (C, C, 1, 1) as (C, C).
    if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        w = w[:, :, 0, 0]
    if tuple(w.shape) != (channels, channels):
        raise ValueError(f"{name}: expected shape ({channels}, {channels}) or "
                         f"({channels}, {channels}, 1, 1), got {tuple(w.shape)}")
    return w


def _as_vector(b: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    # A bias or norm parameter: (C,) exactly (copy_ would broadcast a (1,) or 0-d tensor over every channel).
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (channels,):
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{name}: expected shape ({channels},), got {got}")
    return b


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, with GroupNorm and a residual.

    Args:
        channels: C, the channel count (= heads * head width).
        num_groups: GroupNorm groups (must divide ``channels``).
        eps: GroupNorm epsilon.
        heads: attention heads; the head width is ``channels // heads``.
        rescale_output_factor: the output (attention + residual) is divided by it, as diffusers'
            ``Attention(rescale_output_factor=...)`` does (1.0 in DDPM).
        backend: passed to :func:`fastddpm.ops.attention`.

    forward(x): x of shape (B, C, H, W) -> x + attn(x), same shape.
    """

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5, heads: int = 1, *,
                 rescale_output_factor: float = 1.0, backend: str = "auto"):
        super().__init__()
        channels = check_module_int(channels, "channels")
        heads = check_module_int(heads, "heads")
        num_groups = check_module_int(num_groups, "num_groups")
        rescale_output_factor = check_number(rescale_output_factor, "rescale_output_factor", "a nonzero number")
        if not (rescale_output_factor != 0 and abs(rescale_output_factor) < float("inf")):
            raise ValueError(f"rescale_output_factor: expected a finite nonzero number (the output is divided by "
                             f"it), got {rescale_output_factor}")
        check_backend(backend)
        if channels % heads:
            raise ValueError(f"heads: expected a positive divisor of channels={channels}, got {heads}")
        if channels % num_groups:
            raise ValueError(
                f"num_groups: expected a positive divisor of channels={channels}, got {num_groups}")
        self.channels = channels
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.backend = backend
        self.norm = _make_norm(num_groups, channels, eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # rows: [W_q; W_k; W_v]
        self.proj_out = nn.Linear(channels, channels)

    # The norm's own settings, read from it so that there is one copy to change.
    @property
    def num_groups(self) -> int:
        return self.norm.num_groups

    @property
    def eps(self) -> float:
        return self.norm.eps

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_groups={self.num_groups}, eps={self.eps}, heads={self.heads}"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.qkv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: expected {self.qkv.weight.dtype}, the dtype of the block's parameters, got "
                            f"{x.dtype} (convert the input, or the block with .to(dtype))")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        N, d = H * W, C // self.heads
        # Positions as rows: a view of a channels_last x, one copy of an NCHW one.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B * N, C)  # (B N, C)
        qkv = F.linear(h, self.qkv.weight, self.qkv.bias)  # (B N, 3C): 2-D, so a single addmm
        q, k, v = qkv.view(B, N, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
        o = self._attend(q, k, v)  # (B, heads, N, d)
        o = F.linear(o.transpose(1, 2).reshape(B * N, C), self.proj_out.weight, self.proj_out.bias)  # (B N, C)
        # x first: the sum takes x's memory format, so an NCHW model stays NCHW (the projection
        # viewed as (B, C, H, W) is channels_last-strided).
        out = x + o.view(B, H, W, C).permute(0, 3, 1, 2)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    # ------------------------------------------------------------------ conversions
    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a diffusers ``Attention``'s parameters (group_norm.*, to_q.*, to_k.*, to_v.*, to_out.0.*)."""
        C = self.channels
        need = ("group_norm.weight", "group_norm.bias", "to_q.weight", "to_k.weight", "to_v.weight",
                "to_out.0.weight", "to_out.0.bias")
        missing = [k for k in need if k not in sd]
        if missing:
            raise KeyError(f"sd: missing diffusers Attention keys {missing}")
        w = torch.cat([_as_matrix(sd[f"to_{n}.weight"], f"to_{n}.weight", C) for n in "qkv"])
        zero = torch.zeros(C, dtype=w.dtype, device=w.device)
        b = torch.cat([_as_vector(sd.get(f"to_{n}.bias", zero), f"to_{n}.bias", C) for n in "qkv"])  # (bias=False
        for key in ("group_norm.weight", "group_norm.bias", "to_out.0.bias"):  # blocks have none)
            _as_vector(sd[key], key, C)
        with torch.no_grad():
            self.norm.weight.copy_(sd["group_norm.weight"])
            self.norm.bias.copy_(sd["group_norm.bias"])
            self.qkv.weight.copy_(w)
            self.qkv.bias.copy_(b)
            self.proj_out.weight.copy_(_as_matrix(sd["to_out.0.weight"], "to_out.0.weight", C))
            self.proj_out.bias.copy_(sd["to_out.0.bias"])

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under diffusers' ``Attention`` keys."""
        C = self.channels
        w, b = self.qkv.weight.detach(), self.qkv.bias.detach()
        out = {"group_norm.weight": self.norm.weight.detach().clone(),
               "group_norm.bias": self.norm.bias.detach().clone()}
        for i, n in enumerate("qkv"):
            out[f"to_{n}.weight"] = w[i * C:(i + 1) * C].clone()
            out[f"to_{n}.bias"] = b[i * C:(i + 1) * C].clone()
        out["to_out.0.weight"] = self.proj_out.weight.detach().clone()
        out["to_out.0.bias"] = self.proj_out.bias.detach().clone()
        return out

    def load_ddpm_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the original DDPM layout: norm.*, q.*, k.*, v.*, proj_out.* (1x1 conv or (C, C) weights)."""
        C = self.channels
        missing = [f"{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")
                   if f"{n}.{p}" not in sd]
        if missing:
            raise KeyError(f"sd: missing DDPM attention keys {missing}")
        for key in ("norm.weight", "norm.bias", "q.bias", "k.bias", "v.bias", "proj_out.bias"):
            _as_vector(sd[key], key, C)  # (copy_ broadcast a (1,) or 0-d tensor over every channel)
        with torch.no_grad():
            self.norm.weight.copy_(sd["norm.weight"])
            self.norm.bias.copy_(sd["norm.bias"])
            self.qkv.weight.copy_(torch.cat([_as_matrix(sd[f"{n}.weight"], f"{n}.weight", C) for n in "qkv"]))
            self.qkv.bias.copy_(torch.cat([sd[f"{n}.bias"] for n in "qkv"]))
            self.proj_out.weight.copy_(_as_matrix(sd["proj_out.weight"], "proj_out.weight", C))
            self.proj_out.bias.copy_(sd["proj_out.bias"])

    def ddpm_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters in the original DDPM layout (1x1 conv weights of shape (C, C, 1, 1))."""
        d = self.diffusers_state_dict()
        out = {"norm.weight": d["group_norm.weight"], "norm.bias": d["group_norm.bias"]}
        for n in "qkv":
            out[f"{n}.weight"] = d[f"to_{n}.weight"][:, :, None, None]
            out[f"{n}.bias"] = d[f"to_{n}.bias"]
        out["proj_out.weight"] = d["to_out.0.weight"][:, :, None, None]
        out["proj_out.bias"] = d["to_out.0.bias"]
        return out

    @classmethod
    def from_diffusers(cls, attn: nn.Module, backend: str = "auto") -> AttentionBlock:
        """An AttentionBlock with the configuration and weights of a diffusers ``Attention``."""
        gn = getattr(attn, "group_norm", None)
        if gn is None:
            raise ValueError("attn: expected a diffusers Attention with a group_norm (norm_num_groups set)")
        if not getattr(attn, "residual_connection", False):
            raise ValueError("attn: expected residual_connection=True (the U-Net's attention block)")
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("attn: cross-attention is not supported")
        channels = attn.to_q.in_features
        scale = getattr(attn, "scale", None)
        head_dim = channels // attn.heads
        if scale is not None and abs(float(scale) - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
            raise ValueError(f"attn: its scale is {float(scale)!r} (scale_qk=False, or a custom dim_head); "
                             f"AttentionBlock scales by 1/sqrt(head dim {head_dim}) = {head_dim**-0.5!r}, as "
                             "UNet2DModel's attention does")
        block = cls(channels, gn.num_groups, gn.eps, heads=attn.heads,
                    rescale_output_factor=float(getattr(attn, "rescale_output_factor", 1.0)), backend=backend)
        p = attn.to_q.weight
        block.to(device=p.device, dtype=p.dtype)
        block.load_diffusers_state_dict({k: v for k, v in attn.state_dict().items()})
        return block

    def to_diffusers(self) -> nn.Module:
        """A diffusers ``Attention`` (as UNet2DModel builds it) with this block's weights."""
        from diffusers.models.attention_processor import Attention

        attn = Attention(self.channels, heads=self.heads, dim_head=self.channels // self.heads,
                         rescale_output_factor=self.rescale_output_factor, eps=self.eps,
                         norm_num_groups=self.num_groups, residual_connection=True, bias=True,
                         upcast_softmax=True, _from_deprecated_attn_block=True)
        p = self.qkv.weight
        attn.to(device=p.device, dtype=p.dtype)
        attn.load_state_dict(self.diffusers_state_dict())
        return attn
