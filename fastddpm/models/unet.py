"""The DDPM U-Net (Ho et al. 2020, appendix B) on fastddpm's fused GroupNorm+SiLU and attention.

The network: a sinusoidal time embedding through a 2-layer MLP; a down path of ``len(channel_mult)``
levels, each ``layers_per_block`` ResNet blocks (self-attention after each where the level's resolution
is in ``attention_resolutions``) then a strided 3x3 conv (not on the last level); a middle of ResNet,
attention, ResNet; an up path mirroring it with ``layers_per_block + 1`` ResNet blocks per level, each
taking a skip connection, then nearest-neighbour x2 and a 3x3 conv; GroupNorm+SiLU and a 3x3 conv out.

Module names follow diffusers' ``UNet2DModel`` (conv_in, time_embedding.linear_1, down_blocks.0.resnets.1.
norm2, ..., conv_out), so a state_dict converts to and from diffusers' by renaming only the attention
blocks' entries (see :mod:`fastddpm.compat.diffusers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import nn as fnn
from .._fields import check_fields
from ..compat.ddpm_keys import state_dict_from_ddpm, state_dict_to_ddpm

__all__ = ["UNet", "UNetConfig", "state_dict_from_ddpm", "state_dict_to_ddpm"]


@dataclass
class UNetConfig:
    """Everything that fixes a :class:`UNet`'s shape and behaviour (serialises to JSON and back).

    Attributes:
        sample_size: image height and width the network is built for (attention resolutions refer to it).
        in_channels: channels of the input image.
        out_channels: channels of the output; None means ``in_channels`` (times 2 with ``learned_variance``).
        learned_variance: output the eps prediction and the variance interpolation values
            (2 x in_channels, Nichol & Dhariwal 2021) when out_channels is None.
        base_channels: channels of the first level.
        channel_mult: per-level multipliers of base_channels; the number of levels.
        layers_per_block: ResNet blocks per level on the down path (the up path has one more).
        attention_resolutions: resolutions (height of the feature map) with self-attention after each ResNet
            block; each must be the resolution of some level.
        mid_attention: self-attention between the two ResNet blocks of the middle.
        num_heads: attention heads of every attention block (used when head_dim is None).
        head_dim: if set, every attention block has channels // head_dim heads (diffusers' convention).
        dropout: dropout probability inside the ResNet blocks (before their second conv).
        norm_num_groups: groups of every GroupNorm.
        norm_eps: eps of every GroupNorm.
        flip_sin_to_cos: time embedding [cos, sin] (True) or [sin, cos] (False, the original DDPM).
        freq_shift: frequencies exp(-ln(10000) * i / (half - freq_shift)); 1 in the original DDPM.
        time_embedding_dim: width of the time MLP; None means 4 * base_channels.
        downsample_padding: 0 pads the bottom and right by one before a stride-2 3x3 conv without
            padding (the original DDPM, TensorFlow's 'SAME'); 1 pads by one on every side.
        mid_block_scale_factor: the middle's ResNet and attention outputs are divided by it (1 in DDPM).
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    learned_variance: bool = False
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 1
    head_dim: int | None = None
    dropout: float = 0.1
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    time_embedding_dim: int | None = None
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self)  # "12" is not a list of levels, "no" not true or false
        for f in dataclasses.fields(self):  # numpy integers as ints (validate's checks, JSON)
            v = getattr(self, f.name)
            if isinstance(v, np.integer):
                setattr(self, f.name, int(v))
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.validate()

    # -- derived values ------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map height at each level."""
        return tuple(self.sample_size >> i for i in range(self.num_levels))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(r in self.attention_resolutions for r in self.resolutions)

    @property
    def out_channels_resolved(self) -> int:
        if self.out_channels is not None:
            return self.out_channels
        return self.in_channels * (2 if self.learned_variance else 1)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.base_channels

    def heads_for(self, channels: int) -> int:
        return channels // self.head_dim if self.head_dim is not None else self.num_heads

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")

        for name in ("sample_size", "in_channels", "base_channels", "layers_per_block", "norm_num_groups",
                     "num_heads"):
            positive_int(name, getattr(self, name))
        if self.out_channels is not None:
            positive_int("out_channels", self.out_channels)
        if self.time_embedding_dim is not None:
            positive_int("time_embedding_dim", self.time_embedding_dim)
        if self.head_dim is not None:
            positive_int("head_dim", self.head_dim)
        if not self.channel_mult:
            raise ValueError("channel_mult: expected at least one level, got ()")
        for m in self.channel_mult:
            if m <= 0:
                raise ValueError(f"channel_mult: multipliers must be positive, got {self.channel_mult}")
        # Each level but the last halves the resolution; the up path doubles it back and must meet the
        # skip connections at the same size, so the image size must halve exactly num_levels - 1 times.
        div = 2 ** (self.num_levels - 1)
        if self.sample_size % div != 0:
            raise ValueError(
                f"sample_size: {self.sample_size} cannot be halved {self.num_levels - 1} times "
                f"(channel_mult has {self.num_levels} levels); it must be a multiple of {div}"
            )
        for r in self.attention_resolutions:
            if r not in self.resolutions:
                raise ValueError(
                    f"attention_resolutions: resolution {r} never occurs; the levels of a "
                    f"{self.sample_size}x{self.sample_size} input have resolutions {list(self.resolutions)}"
                )
        for c in self.block_out_channels:
            if c % self.norm_num_groups != 0:
                raise ValueError(
                    f"norm_num_groups: the level width {c} (base_channels={self.base_channels} x "
                    f"channel_mult) is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        attn_channels = [c for c, a in zip(self.block_out_channels, self.attention_levels) if a]
        if self.mid_attention:
            attn_channels.append(self.block_out_channels[-1])
        for c in attn_channels:
            if self.head_dim is not None and c % self.head_dim != 0:
                raise ValueError(f"head_dim: attention width {c} is not divisible by {self.head_dim}")
            if self.head_dim is None and c % self.num_heads != 0:
                raise ValueError(f"num_heads: attention width {c} is not divisible by {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected a positive float, got {self.norm_eps}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding: expected 0 (DDPM) or 1, got {self.downsample_padding!r}")
        if not self.mid_block_scale_factor > 0:
            raise ValueError(f"mid_block_scale_factor: expected a positive float, "
                             f"got {self.mid_block_scale_factor}")
        half = self.block_out_channels[0] // 2  # the sinusoidal embedding is the first level's width
        if half < 1:  # (no frequency at all: a network blind to the timestep)
            raise ValueError(f"base_channels: the first level's width {self.block_out_channels[0]} leaves the "
                             "sinusoidal time embedding no frequency; expected a width of at least 2")
        if half - self.freq_shift == 0:
            raise ValueError(f"freq_shift: {self.freq_shift} equals half of the first level's width "
                             f"{self.block_out_channels[0]} (division by zero)")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        if not isinstance(d, dict):
            raise TypeError(f"UNetConfig: expected a dict of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"UNetConfig: unknown keys {unknown}")
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, s: str) -> UNetConfig:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"UNetConfig: not JSON ({exc})") from exc
        return cls.from_dict(d)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class SinusoidalTimesteps(nn.Module):
    """t -> [sin(t f), cos(t f)] (DDPM's get_timestep_embedding, diffusers' Timesteps).

    The frequencies are a non-persistent buffer: computed once, moved with the module, absent from
    state_dict (as in diffusers, whose Timesteps has no state).
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        half = num_channels // 2
        # Computed as diffusers does (fp32 arange, fp32 exp) so the embeddings agree to the bit.
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
        self.register_buffer("freqs", torch.exp(exponent), persistent=False)  # (half,)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies in fp32 when the module is cast to half (as diffusers' fp32 embedding).
        freqs = self.freqs
        out = super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:
            self.freqs = freqs.to(device=self.freqs.device)
        return out

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, num_channels) fp32
        arg = t.float()[:, None] * self.freqs[None, :]
        if self.flip_sin_to_cos:
            emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
        else:
            emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.num_channels % 2 == 1:
            emb = F.pad(emb, (0, 1))
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, freq_shift={self.freq_shift}"


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding, the original temb.dense)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm+SiLU, 3x3 conv, + time projection, GroupNorm+SiLU, dropout, 3x3 conv, + skip.

    forward(x, temb_proj) takes this block's projection of SiLU(time embedding), ``time_emb_proj``
    applied to it, shape (B, out_channels): :class:`UNet` computes the projections of all its blocks
    in one matrix product. The time-embedding add is the ``shift`` of the second fused GroupNorm+SiLU,
    so it makes no pass over the feature map of its own.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float, output_scale_factor: float = 1.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = fnn.GroupNormSiLU(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = fnn.GroupNormSiLU(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_proj: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # (B, Cout, H, W)
        h = self.conv2(self.dropout(self.norm2(h, shift=temb_proj)))  # GN+SiLU of h + temb_proj
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # In place: convolution's backward does not need its output, and a fresh (B, C, H, W) buffer
        # costs page faults on the CPU.
        h = h.add_(skip)
        if self.output_scale_factor != 1.0:
            h = h.div_(self.output_scale_factor)
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding 0 pads bottom/right first (DDPM), padding 1 pads every side."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attention(channels: int, cfg: UNetConfig, rescale_output_factor: float = 1.0) -> nn.Module:
    return fnn.AttentionBlock(channels, cfg.norm_num_groups, cfg.norm_eps, heads=cfg.heads_for(channels),
                              rescale_output_factor=rescale_output_factor)


class _Block(nn.Module):
    """Shared gradient-checkpointing logic of the down, middle and up blocks."""

    gradient_checkpointing = False

    def _run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class DownBlock(_Block):
    """One level of the down path (diffusers' DownBlock2D / AttnDownBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, attention: bool,
                 downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg.time_embed_dim,
                        cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(cfg.layers_per_block)
        )
        self.attentions = (nn.ModuleList(_attention(out_channels, cfg) for _ in range(cfg.layers_per_block))
                           if attention else None)
        self.downsamplers = (nn.ModuleList([Downsample(out_channels, cfg.downsample_padding)])
                             if downsample else None)

    def forward(self, x: torch.Tensor, projs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, projs[resnet.temb_index])
            if self.attentions is not None:
                x = self._run(self.attentions[i], x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self._run(self.downsamplers[0], x)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    """ResNet, attention, ResNet (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.output_scale_factor = s
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                        cfg.dropout, s)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([_attention(channels, cfg, s)]) if cfg.mid_attention else None

    def forward(self, x: torch.Tensor, projs) -> torch.Tensor:
        r0, r1 = self.resnets
        x = self._run(r0, x, projs[r0.temb_index])
        if self.attentions is not None:
            x = self._run(self.attentions[0], x)
        return self._run(r1, x, projs[r1.temb_index])


class UpBlock(_Block):
    """One level of the up path (diffusers' UpBlock2D / AttnUpBlock2D)."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, cfg: UNetConfig,
                 attention: bool, upsample: bool) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList()
        for i in range(n):
            skip_ch = in_channels if i == n - 1 else out_channels
            res_in = prev_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock(res_in + skip_ch, out_channels, cfg.time_embed_dim,
                                            cfg.norm_num_groups, cfg.norm_eps, cfg.dropout))
        self.attentions = (nn.ModuleList(_attention(out_channels, cfg) for _ in range(n))
                           if attention else None)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], projs) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(resnet, x, projs[resnet.temb_index])
            if self.attentions is not None:
                x = self._run(self.attentions[i], x)
        if self.upsamplers is not None:
            x = self._run(self.upsamplers[0], x)
        return x


# ----------------------------------------------------------------------------------------------
# The U-Net
# ----------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """The DDPM noise-prediction network: ``forward(x, t)`` -> eps prediction of x's shape.

    Build it from a :class:`UNetConfig` (or keyword arguments of one), or with a preset:
    :meth:`ddpm_cifar10`, :meth:`digits`, :meth:`tiny`.

    Performance switches: ``model.to(memory_format=torch.channels_last)`` runs channels_last end to end
    (the input is converted to the layout of conv_in's weight); ``model.enable_gradient_checkpointing()``
    recomputes each block's activations in the backward; ``torch.compile(model, fullgraph=True)`` traces
    through the fused ops.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        else:
            if isinstance(config, dict):
                config = UNetConfig.from_dict(config)
            if not isinstance(config, UNetConfig):
                raise TypeError(f"config: expected a UNetConfig or a dict, got {type(config).__name__}")
            # a copy, checked again (__post_init__): a config changed after it was made is refused here, not
            # built into a network whose own config would not load back
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        cfg = config
        chans = cfg.block_out_channels
        L = cfg.num_levels
        attn = cfg.attention_levels

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_proj = SinusoidalTimesteps(chans[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepMLP(chans[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i in range(L):
            in_ch, out_ch = out_ch, chans[i]
            self.down_blocks.append(DownBlock(in_ch, out_ch, cfg, attn[i], downsample=i < L - 1))

        self.mid_block = MidBlock(chans[-1], cfg)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        rev_attn = list(reversed(attn))
        out_ch = rev[0]
        for i in range(L):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, L - 1)]
            self.up_blocks.append(UpBlock(in_ch, prev_ch, out_ch, cfg, rev_attn[i], upsample=i < L - 1))

        self.conv_norm_out = fnn.GroupNormSiLU(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels_resolved, 3, padding=1)

        # The ResNet blocks' time projections, computed together (see _time_projections).
        resnets = [m for m in self.modules() if isinstance(m, ResnetBlock)]
        for i, r in enumerate(resnets):
            r.temb_index = i
        self._temb_blocks = resnets  # a plain list: no second registration of the blocks
        self._temb_sizes = [r.out_channels for r in resnets]
        self._temb_steady = 0  # depth of steady_weights() blocks
        self._temb_cache: tuple | None = None

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def _preset(cls, overrides: dict, **config) -> UNet:
        """A preset in the original DDPM code's conventions (one attention head, GroupNorm eps 1e-6, the
        embedding's sin-cos order with shift 1, no padding before the strided downsampling convolution):
        ``config`` on top of them, then the caller's ``overrides``."""
        cfg = UNetConfig(num_heads=1, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                         **config)
        return cls(dataclasses.replace(cfg, **overrides) if overrides else cfg)

    @classmethod
    def ddpm_cifar10(cls, **overrides) -> UNet:
        """The DDPM CIFAR-10 network (Ho et al. 2020; google/ddpm-cifar10-32): 35,746,307 parameters."""
        return cls._preset(overrides, sample_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                           layers_per_block=2, attention_resolutions=(16,), dropout=0.1, norm_num_groups=32)

    @classmethod
    def digits(cls, **overrides) -> UNet:
        """A small greyscale 16x16 network (1,112,801 parameters) that trains on a laptop CPU in minutes
        (e.g. on scikit-learn's 8x8 digits upsampled to 16x16)."""
        return cls._preset(overrides, sample_size=16, in_channels=1, base_channels=32, channel_mult=(1, 2, 2),
                           layers_per_block=1, attention_resolutions=(8,), dropout=0.0, norm_num_groups=8)

    @classmethod
    def tiny(cls, **overrides) -> UNet:
        """A network of 177,427 parameters for tests: 8x8, two levels, attention at 4x4."""
        return cls._preset(overrides, sample_size=8, in_channels=3, base_channels=16, channel_mult=(1, 2),
                           layers_per_block=1, attention_resolutions=(4,), dropout=0.0, norm_num_groups=4)

    # -- switches ------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each ResNet, attention and resampling block in the backward instead of keeping
        its activations (less memory in training, one more forward of compute)."""
        for m in self.modules():
            if isinstance(m, _Block):
                m.gradient_checkpointing = enabled
        return self

    def disable_gradient_checkpointing(self) -> UNet:
        return self.enable_gradient_checkpointing(False)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mid_block.gradient_checkpointing

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the original DDPM checkpoint layout ---------------------------------------------------
    def load_ddpm_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load weights saved in the original DDPM layout (pytorch_diffusion / ddim naming)."""
        self.load_state_dict(state_dict_from_ddpm(sd, self.config))

    def ddpm_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights in the original DDPM layout."""
        return state_dict_to_ddpm({k: v.detach() for k, v in self.state_dict().items()}, self.config)

    # -- forward -------------------------------------------------------------------------------
    def check_input_shape(self, shape) -> None:
        """Raise ValueError unless ``shape`` is an input this network takes: (B, in_channels, H, W) with H and W
        multiples of 2**(levels - 1) (fastddpm.sample checks it before its first step)."""
        if len(shape) != 4 or shape[1] != self.config.in_channels:
            raise ValueError(f"x: expected shape (B, {self.config.in_channels}, H, W), got {tuple(shape)}")
        H, W = shape[2], shape[3]
        div = 2 ** (self.config.num_levels - 1)
        if H % div or W % div or not (H > 0 and W > 0):
            raise ValueError(f"x: height and width must be positive multiples of {div} (the down path halves them "
                             f"{self.config.num_levels - 1} times), got {H}x{W}")

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """x: (B, in_channels, H, W) with H and W multiples of 2**(levels - 1); t: (B,) or a scalar
        (int or float timesteps; a Python float such as 3.5 is embedded as is, where diffusers' UNet2DModel
        truncates a non-tensor timestep to an integer). Returns (B, out_channels, H, W)."""
        if not torch.is_tensor(x):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        self.check_input_shape(x.shape)
        w = self.conv_in.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):  # (autocast casts per op)
            raise TypeError(f"x: expected {w.dtype}, the dtype of the network's parameters, got {x.dtype} (convert "
                            "the input, or the network with .to(dtype))")
        B = x.shape[0]
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
                raise TypeError(f"t: expected a timestep tensor, an int or a float, got {type(t).__name__}")
            t = t.item() if isinstance(t, (np.integer, np.floating)) else t
            if not (math.isfinite(t) and -2**63 <= t < 2**63):
                raise ValueError(f"t: expected a finite timestep, got {t!r}")
            t = torch.full((B,), t, device=x.device,
                           dtype=torch.float32 if isinstance(t, float) else torch.long)
        elif t.dtype == torch.bool or t.dtype.is_complex:  # (True embedded as 1; an imaginary part dropped)
            raise TypeError(f"t: expected an integer or float timestep tensor, got {t.dtype}")
        elif t.is_floating_point() and t.is_cpu and not torch.compiler.is_compiling() and \
                not bool(torch.isfinite(t).all()):  # (checked where it costs no device sync)
            raise ValueError(f"t: expected finite timesteps, got {t.tolist() if t.numel() <= 8 else 'NaN or inf'}")
        if t.dim() == 0:
            t = t.reshape(1).expand(B)
        elif t.shape != (B,):
            if t.dim() == 1 and t.numel() == 1:
                t = t.expand(B)
            else:
                raise ValueError(f"t: expected a scalar or shape ({B},), got {tuple(t.shape)}")
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and \
                not self.conv_in.weight.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)

        # 1. time: sinusoidal embedding -> MLP; every ResNet block projects SiLU of it.
        emb = self.time_embedding(self.time_proj(t.to(x.device)).to(self.dtype))  # (B, temb)
        projs = self._time_projections(F.silu(emb))  # one (B, C_block) view per ResNet block

        # 2. down
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, projs)
            skips.extend(s)
        # 3. middle
        h = self.mid_block(h, projs)
        # 4. up
        for block in self.up_blocks:
            h = block(h, skips, projs)
        # 5. out
        return self.conv_out(self.conv_norm_out(h))

    @contextlib.contextmanager
    def steady_weights(self):
        """A block in which the weights do not change, such as a sampling loop (fastddpm.sample and the
        pipelines run their steps in one): the time projections' concatenated weights are made once in it
        and reused, instead of at every forward. They are dropped when the block ends."""
        self._temb_steady += 1
        try:
            yield self
        finally:
            self._temb_steady -= 1
            if not self._temb_steady:
                self._temb_cache = None

    def _time_projections(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every ResNet block's ``time_emb_proj(temb)``, as one matrix product split into views.

        One (B, T) x (T, sum C) product instead of a small one per block (the DDPM CIFAR-10 network has 22),
        on the blocks' weights concatenated at each call; inside :meth:`steady_weights` without autograd,
        concatenated once and reused (rebuilt if a parameter is replaced, moved or updated in place through
        autograd-visible ops). Outside it nothing is cached: an update without a version bump (``p.data``
        edits, a fused optimizer) made a kept concatenation stale, and no_grad outputs wrong. Each block's
        module is read at the call: a replaced one that is no plain Linear (a LoRA wrapper) is called as it is.
        """
        lins = [r.time_emb_proj for r in self._temb_blocks]
        if not all(type(lin) is nn.Linear for lin in lins):
            return tuple(lin(temb) for lin in lins)
        params = [p for lin in lins for p in (lin.weight, lin.bias)]
        if (not self._temb_steady or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and any(p.requires_grad for p in params))):
            w = torch.cat([lin.weight for lin in lins])
            b = torch.cat([lin.bias for lin in lins])
            return F.linear(temb, w, b).split(self._temb_sizes, dim=1)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._temb_cache is None or self._temb_cache[0] != key:
            with torch.no_grad():  # transposed once: addmm on it is the fastest product (a transposing copy at
                # every call is not: 55 ms for the CIFAR-10 network's 10 MB on the CPU)
                w_t = torch.cat([lin.weight for lin in lins]).t().contiguous()  # (T, sum C)
                b = torch.cat([lin.bias for lin in lins])
            self._temb_cache = (key, w_t, b)
        _, w_t, b = self._temb_cache
        return torch.addmm(b, temb, w_t).split(self._temb_sizes, dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_parameters():,} parameters"
