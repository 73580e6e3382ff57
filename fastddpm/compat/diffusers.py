"""diffusers interoperability: UNet2DModel <-> fastddpm.UNet, and patching a UNet2DModel in place.

diffusers is optional: it is imported inside the functions that need it, never at import time.

* :func:`from_diffusers` / :func:`to_diffusers` convert a ``UNet2DModel`` of the DDPM family (DownBlock2D,
  AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, UNetMidBlock2D, positional time embedding) to and from a
  :class:`fastddpm.UNet` with the same weights. Module names agree except inside the attention blocks
  (diffusers' separate to_q/to_k/to_v become one qkv matrix), so :func:`state_dict_from_diffusers` and
  :func:`state_dict_to_diffusers` are pure renamings that also work on checkpoint files.
* :func:`patch` / :func:`unpatch` swap, in place and reversibly, the GroupNorm+SiLU pairs of every
  ``ResnetBlock2D`` (and the model's output norm) and the attention computation of every ``Attention``
  for fastddpm's fused ops. No parameter, buffer or submodule changes, so state_dict, save_pretrained
  and from_pretrained, pipelines and gradient checkpointing all keep working.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models.unet import UNet, UNetConfig
from ..ops.attention import attention
from ..ops.group_norm_silu import group_norm_silu

__all__ = [
    "config_from_diffusers",
    "config_to_diffusers",
    "from_diffusers",
    "is_patched",
    "patch",
    "patched_blocks",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "to_diffusers",
    "unpatch",
]

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


class UnsupportedDiffusersConfig(ValueError):
    """A UNet2DModel configuration outside the DDPM family; the message names the option or block."""


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------
def config_from_diffusers(config) -> UNetConfig:
    """The :class:`UNetConfig` of a ``UNet2DModel`` config (a FrozenDict, dict or the model itself).

    Raises :class:`UnsupportedDiffusersConfig` naming the block type or option outside the DDPM family.
    """
    c = getattr(config, "config", config)
    if isinstance(c, UNetConfig) or not isinstance(c, Mapping):
        raise TypeError(f"config: expected a diffusers UNet2DModel, its config or a dict of it, got "
                        f"{type(config).__name__}")
    c = dict(c)

    def get(name, default=None):
        return c.get(name, default)

    def unsupported(option, value, expected):
        raise UnsupportedDiffusersConfig(
            f"{option}={value!r} is not supported by fastddpm.UNet (expected {expected})")

    if get("time_embedding_type", "positional") != "positional":
        unsupported("time_embedding_type", get("time_embedding_type"), "'positional'")
    if get("center_input_sample", False):
        unsupported("center_input_sample", True, "False")
    if get("act_fn", "silu") not in ("silu", "swish"):
        unsupported("act_fn", get("act_fn"), "'silu'")
    if get("resnet_time_scale_shift", "default") != "default":
        unsupported("resnet_time_scale_shift", get("resnet_time_scale_shift"), "'default'")
    if get("class_embed_type") is not None:
        unsupported("class_embed_type", get("class_embed_type"), "None")
    if get("num_class_embeds") is not None:
        unsupported("num_class_embeds", get("num_class_embeds"), "None")
    if get("downsample_type", "conv") != "conv":
        unsupported("downsample_type", get("downsample_type"), "'conv'")
    if get("upsample_type", "conv") != "conv":
        unsupported("upsample_type", get("upsample_type"), "'conv'")
    if get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D":
        unsupported("mid_block_type", get("mid_block_type"), "'UNetMidBlock2D'")
    groups = get("norm_num_groups", 32)
    if groups is None:
        unsupported("norm_num_groups", None, "an int")
    if get("attn_norm_num_groups") not in (None, groups):
        unsupported("attn_norm_num_groups", get("attn_norm_num_groups"), f"None or norm_num_groups={groups}")
    if get("downsample_padding", 1) not in (0, 1):
        unsupported("downsample_padding", get("downsample_padding"), "0 or 1")

    # diffusers' UNet2DModel defaults for the keys a config may leave out
    down = get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    up = get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    for name, blocks in (("down_block_types", down), ("up_block_types", up)):
        if not isinstance(blocks, (list, tuple)) or not blocks:
            unsupported(name, blocks, "a non-empty list of block names")
    down, up = list(down), list(up)
    for i, b in enumerate(down):
        if b not in _DOWN_TYPES:
            unsupported(f"down_block_types[{i}]", b, " or ".join(_DOWN_TYPES))
    for i, b in enumerate(up):
        if b not in _UP_TYPES:
            unsupported(f"up_block_types[{i}]", b, " or ".join(_UP_TYPES))
    if len(down) != len(up):
        unsupported("up_block_types", up, f"{len(down)} blocks like down_block_types")
    L = len(down)
    for i in range(L):
        if _DOWN_TYPES[down[i]] != _UP_TYPES[up[L - 1 - i]]:
            raise UnsupportedDiffusersConfig(
                f"down_block_types[{i}]={down[i]!r} and up_block_types[{L - 1 - i}]={up[L - 1 - i]!r}: "
                "fastddpm.UNet puts attention at the same resolutions on the down and up paths")

    chans = get("block_out_channels", (224, 448, 672, 896))
    chans = list(chans) if isinstance(chans, (list, tuple)) else chans
    if not isinstance(chans, list) or not chans or any(
            isinstance(ch, bool) or not isinstance(ch, int) or ch <= 0 for ch in chans):
        unsupported("block_out_channels", chans, "positive ints")
    if len(chans) != L:  # one width per down block (diffusers' UNet2DModel refuses another count)
        unsupported("block_out_channels", chans, f"one width per block ({L} blocks)")
    # The widest base dividing every width: (16, 24) is base 8 x (2, 3), as to_diffusers writes a
    # fastddpm config whose first multiplier is not 1.
    base = math.gcd(*chans)
    size = get("sample_size")
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            unsupported("sample_size", size, "a square size")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        unsupported("sample_size", size, "a positive int")
    res = [size >> i for i in range(L)]
    head_dim = get("attention_head_dim", 8)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        unsupported("attention_head_dim", head_dim, "a positive int or None")
    for name, default in (("dropout", 0.0), ("norm_eps", 1e-5), ("freq_shift", 0), ("mid_block_scale_factor", 1)):
        v = get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            unsupported(name, v, "a number")
    attn_widths = [c for c, b in zip(chans, down) if _DOWN_TYPES[b]] + ([chans[-1]] if get("add_attention", True)
                                                                       else [])
    if head_dim is not None and any(isinstance(head_dim, int) and w % head_dim for w in attn_widths):
        # diffusers then attends over width // head_dim heads x head_dim, narrower than the block
        unsupported("attention_head_dim", head_dim, f"a divisor of the attention widths {sorted(set(attn_widths))}")
    tdim = get("time_embedding_dim")
    return UNetConfig(
        sample_size=int(size),
        in_channels=get("in_channels", 3),
        out_channels=get("out_channels", 3),
        base_channels=base,
        channel_mult=tuple(ch // base for ch in chans),
        layers_per_block=get("layers_per_block", 2),
        attention_resolutions=tuple(res[i] for i in range(L) if _DOWN_TYPES[down[i]]),
        mid_attention=bool(get("add_attention", True)),
        num_heads=1,
        head_dim=head_dim,  # None: one head per block (diffusers uses the block width as the head width)
        dropout=float(get("dropout", 0.0)),
        norm_num_groups=groups,
        norm_eps=float(get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)),
        # diffusers' default is 4 x the first width, fastddpm's 4 x base_channels
        time_embedding_dim=None if (tdim or 4 * chans[0]) == 4 * base else (tdim or 4 * chans[0]),
        downsample_padding=int(get("downsample_padding", 1)),
        mid_block_scale_factor=float(get("mid_block_scale_factor", 1)),
    )


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """Keyword arguments of ``UNet2DModel`` that build the network of ``cfg``."""
    if not isinstance(cfg, UNetConfig):
        raise TypeError(f"cfg: expected a fastddpm.UNetConfig, got {type(cfg).__name__}")
    attn = cfg.attention_levels
    if cfg.head_dim is not None:
        head_dim = cfg.head_dim
    elif cfg.num_heads == 1:
        head_dim = None  # diffusers: head width = block width, one head
    else:
        widths = {c for c, a in zip(cfg.block_out_channels, attn) if a}
        if cfg.mid_attention:
            widths.add(cfg.block_out_channels[-1])
        if len(widths) > 1:
            raise UnsupportedDiffusersConfig(
                f"num_heads={cfg.num_heads} with attention at widths {sorted(widths)}: diffusers fixes the "
                "head width (attention_head_dim), not the head count; set head_dim instead")
        head_dim = widths.pop() // cfg.num_heads if widths else None
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels_resolved,
        center_input_sample=False,
        time_embedding_type="positional",
        # diffusers' default width is 4 x the first level's, fastddpm's 4 x base_channels: they differ
        # when channel_mult[0] != 1, so the width is written out then.
        time_embedding_dim=None if cfg.time_embed_dim == 4 * cfg.block_out_channels[0] else cfg.time_embed_dim,
        freq_shift=cfg.freq_shift,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        mid_block_scale_factor=cfg.mid_block_scale_factor,
        downsample_padding=cfg.downsample_padding,
        dropout=cfg.dropout,
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        add_attention=cfg.mid_attention,
    )


# ----------------------------------------------------------------------------------------------
# State dicts (pure renamings: the module trees agree outside the attention blocks)
# ----------------------------------------------------------------------------------------------
def _attention_prefixes(keys) -> list[str]:
    return sorted({k.rsplit(".to_q.weight", 1)[0] for k in keys if k.endswith(".to_q.weight")})


# The attention weights' names before diffusers 0.14 (query, key, value, proj_attn), which older checkpoints such
# as google/ddpm-cifar10-32 still hold; diffusers renames them on load (ModelMixin._fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_key(k: str) -> str:
    head, _, leaf = k.rpartition(".")  # leaf: weight or bias
    path, _, name = head.rpartition(".")
    if name in _LEGACY_ATTENTION and ".attentions." in f".{path}" and leaf in ("weight", "bias"):
        return f"{path}.{_LEGACY_ATTENTION[name]}.{leaf}"
    return k


def _check_state_dict(sd) -> None:
    if not isinstance(sd, Mapping):  # (a model here was diffusers' FutureWarning, then KeyError 'items')
        hint = " (pass model.state_dict())" if isinstance(sd, nn.Module) else ""
        raise TypeError(f"sd: expected a state dict (names to tensors), got {type(sd).__name__}{hint}")


def state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state_dict (DDPM family) under fastddpm.UNet's keys; legacy attention names (query, key,
    value, proj_attn) are read as diffusers reads them."""
    _check_state_dict(sd)
    sd = {_modern_key(k): v for k, v in sd.items()}
    out = dict(sd)
    for p in _attention_prefixes(sd):
        C = sd[f"{p}.to_q.weight"].shape[0]
        zero = sd[f"{p}.to_q.weight"].new_zeros(C)
        out[f"{p}.norm.weight"] = out.pop(f"{p}.group_norm.weight")
        out[f"{p}.norm.bias"] = out.pop(f"{p}.group_norm.bias")
        out[f"{p}.qkv.weight"] = torch.cat([out.pop(f"{p}.to_{n}.weight") for n in "qkv"])
        out[f"{p}.qkv.bias"] = torch.cat([out.pop(f"{p}.to_{n}.bias", zero) for n in "qkv"])
        out[f"{p}.proj_out.weight"] = out.pop(f"{p}.to_out.0.weight")
        out[f"{p}.proj_out.bias"] = out.pop(f"{p}.to_out.0.bias")
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fastddpm.UNet state_dict under UNet2DModel's keys."""
    _check_state_dict(sd)
    out = dict(sd)
    prefixes = sorted({k.rsplit(".qkv.weight", 1)[0] for k in sd if k.endswith(".qkv.weight")})
    for p in prefixes:
        w, b = out.pop(f"{p}.qkv.weight"), out.pop(f"{p}.qkv.bias")
        C = w.shape[1]
        out[f"{p}.group_norm.weight"] = out.pop(f"{p}.norm.weight")
        out[f"{p}.group_norm.bias"] = out.pop(f"{p}.norm.bias")
        for i, n in enumerate("qkv"):
            out[f"{p}.to_{n}.weight"] = w[i * C:(i + 1) * C]
            out[f"{p}.to_{n}.bias"] = b[i * C:(i + 1) * C]
        out[f"{p}.to_out.0.weight"] = out.pop(f"{p}.proj_out.weight")
        out[f"{p}.to_out.0.bias"] = out.pop(f"{p}.proj_out.bias")
    return out


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def from_diffusers(model) -> UNet:
    """A :class:`fastddpm.UNet` with the configuration and weights of a diffusers ``UNet2DModel``
    (on the same device and dtype, in the same train/eval mode)."""
    from diffusers import UNet2DModel

    if not isinstance(model, UNet2DModel):  # (a UNet2DConditionModel got through to load_state_dict's error)
        raise TypeError(f"model: expected a diffusers UNet2DModel, got {type(model).__name__}"
                        f"{' (already a fastddpm.UNet)' if isinstance(model, UNet) else ''}")
    cfg = config_from_diffusers(model.config)
    p = next(model.parameters())
    unet = UNet(cfg).to(device=p.device, dtype=p.dtype)
    unet.load_state_dict(state_dict_from_diffusers(model.state_dict()))
    return unet.train(model.training)


def to_diffusers(unet: UNet):
    """A diffusers ``UNet2DModel`` with the configuration and weights of ``unet``."""
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet):
        raise TypeError(f"unet: expected a fastddpm.UNet, got {type(unet).__name__}")
    model = UNet2DModel(**config_to_diffusers(unet.config))
    p = next(unet.parameters())
    # (a dtype given to .to() makes diffusers warn about modules to keep in float32, even when it changes nothing)
    model.to(device=p.device) if p.dtype == model.dtype else model.to(device=p.device, dtype=p.dtype)
    model.load_state_dict(state_dict_to_diffusers(unet.state_dict()))
    return model.train(unet.training)


# ----------------------------------------------------------------------------------------------
# patch / unpatch: class swaps and attention processors, nothing else changes
# ----------------------------------------------------------------------------------------------
def _silu_ok(m) -> bool:
    return isinstance(m, nn.SiLU)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs):
    # diffusers' ResnetBlock2D.forward with each norm + nonlinearity pair as one fused op.
    n1 = self.norm1
    h = group_norm_silu(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, "silu")
    if self.upsample is not None:
        if h.shape[0] >= 64:
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)  # (B, C) or (B, 2C)
    n2 = self.norm2
    if self.time_embedding_norm == "default":
        # h + temb[:, :, None, None] as the fused op's shift: no pass of its own over h.
        h = group_norm_silu(h, n2.num_groups, n2.weight, n2.bias, n2.eps, "silu", shift=temb)
    else:  # scale_shift: the modulation sits between the norm and the nonlinearity
        if temb is None:
            raise ValueError(f"temb: must be given when time_embedding_norm is {self.time_embedding_norm}")
        scale, shift = torch.chunk(temb[:, :, None, None], 2, dim=1)
        h = group_norm_silu(h, n2.num_groups, n2.weight, n2.bias, n2.eps, None)
        h = F.silu(h * (1 + scale) + shift)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type, forward, tag: str) -> type:
    # One subclass per original class, created once, reachable by pickle through this module.
    if cls not in _PATCHED_CLASSES:
        name = f"Fastddpm{tag}{cls.__name__}"
        sub = type(name, (cls,), {"forward": forward, "_fastddpm_original_class": cls,
                                  "__module__": __name__})
        globals()[name] = sub
        _PATCHED_CLASSES[cls] = sub
    return _PATCHED_CLASSES[cls]


def __getattr__(name: str):
    """The patched classes by name in a process where patch() has not made them yet: a patched model saved
    with torch.save (or sent to a spawned worker) loads there too."""
    rest = name[len("Fastddpm"):] if name.startswith("Fastddpm") else None
    if rest == "SiLUGroupNorm":
        return _patched_class(nn.GroupNorm, _fused_norm_silu_forward, "SiLU")
    if rest == "FusedSiLU":
        return _patched_class(nn.SiLU, _identity_forward, "Fused")
    if rest:
        from diffusers.models.resnet import ResnetBlock2D

        stack = [ResnetBlock2D]  # the class patch() swapped, or one of its subclasses
        while stack:
            cls = stack.pop()
            if cls.__name__ == rest and "_fastddpm_original_class" not in cls.__dict__:
                return _patched_class(cls, _fused_resnet_forward, "")
            stack += cls.__subclasses__()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_norm_silu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, "silu")


def _identity_forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


class FastddpmAttnProcessor:
    """An attention processor for diffusers' U-Net ``Attention`` blocks (self-attention with a
    GroupNorm and a residual) on fastddpm's fused GroupNorm and attention ops.

    Falls back to the processor it replaced (``original``; default diffusers' ``AttnProcessor2_0``) for any
    call it does not cover (cross-attention, masks, spatial norm, 3-D inputs); :func:`unpatch` restores it.
    """

    def __init__(self, original=None) -> None:
        if original is None:  # made directly, for diffusers' set_attn_processor: diffusers' own default
            from diffusers.models.attention_processor import AttnProcessor2_0

            original = AttnProcessor2_0()
        elif not callable(original):
            raise TypeError(f"original: expected an attention processor (a callable), got {type(original).__name__}")
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 4
                or attn.group_norm is None or attn.spatial_norm is not None or attn.norm_q is not None
                or attn.norm_k is not None or args or kwargs):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        residual = hidden_states
        B, C, H, W = hidden_states.shape
        gn = attn.group_norm
        h = group_norm_silu(hidden_states, gn.num_groups, gn.weight, gn.bias, gn.eps, None)
        h = h.reshape(B, C, H * W).transpose(1, 2)  # (B, N, C)
        heads = attn.heads
        q = attn.to_q(h)
        k = attn.to_k(h)
        v = attn.to_v(h)
        d = q.shape[-1] // heads
        q, k, v = (z.reshape(B, H * W, heads, d).transpose(1, 2) for z in (q, k, v))  # (B, heads, N, d)
        o = _attention(q, k, v, attn.scale)
        o = o.transpose(1, 2).reshape(B, H * W, heads * d).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        o = o.transpose(1, 2).reshape(B, C, H, W)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


def _attention(q, k, v, scale):
    # A module-level name, so a test can count the processor's calls of the fused op.
    return attention(q, k, v, scale=scale)


def patch(model, return_count: bool = False):
    """Swap fastddpm's fused ops into a diffusers ``UNet2DModel`` (or any module containing diffusers
    ResnetBlock2D / Attention blocks), in place; returns the model (with ``return_count=True``, the pair
    (model, number of blocks patched by this call)). :func:`unpatch` undoes it; :func:`patched_blocks`
    counts what is patched.

    What changes: every ``ResnetBlock2D`` with GroupNorm and SiLU runs its two norm + SiLU pairs as the
    fused op; the model's ``conv_norm_out`` + ``conv_act`` become one fused op; every ``Attention``
    with a GroupNorm gets :class:`FastddpmAttnProcessor`. Parameters, buffers, module names and the
    state_dict stay exactly as they were.

    Never silent: a ``UserWarning`` says why when nothing was patched (no diffusers block in the model,
    an activation other than SiLU, a norm other than an affine GroupNorm; no warning for a model patched
    already), and which blocks were left when only some were.
    """
    import warnings

    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a diffusers UNet2DModel), got {type(model).__name__}")
    count = 0
    skipped: dict[str, int] = {}
    seen = 0
    for m in model.modules():
        if getattr(type(m), "_fastddpm_original_class", None) is not None:
            continue
        if isinstance(m, ResnetBlock2D):
            seen += 1
            if not _silu_ok(m.nonlinearity):
                why = f"ResnetBlock2D with activation {type(m.nonlinearity).__name__} (fused: SiLU only)"
            elif not (isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm)
                      and m.norm1.affine and m.norm2.affine):
                why = f"ResnetBlock2D with {type(m.norm1).__name__} norms (fused: affine GroupNorm only)"
            else:
                m.__class__ = _patched_class(type(m), _fused_resnet_forward, "")
                count += 1
                continue
            skipped[why] = skipped.get(why, 0) + 1
        elif isinstance(m, Attention):
            seen += 1
            if isinstance(m.processor, FastddpmAttnProcessor):
                continue
            if m.group_norm is None:
                why = "Attention without a GroupNorm (cross- or transformer attention)"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            m.set_processor(FastddpmAttnProcessor(m.processor))
            count += 1
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if (type(norm) is nn.GroupNorm and norm.affine and type(act) is nn.SiLU):
        # UNet2DModel.forward runs conv_norm_out then conv_act: fuse into the first, skip the second.
        norm.__class__ = _patched_class(nn.GroupNorm, _fused_norm_silu_forward, "SiLU")
        act.__class__ = _patched_class(nn.SiLU, _identity_forward, "Fused")
        count += 1
    if count == 0 and sum(patched_blocks(model).values()) == 0:
        if seen == 0:
            hint = " (a fastddpm.UNet runs the fused ops already)" if isinstance(model, UNet) else ""
            why = f"{type(model).__name__} holds no diffusers ResnetBlock2D or Attention block{hint}"
        else:
            why = "; ".join(f"{n} x {w}" for w, n in skipped.items())
        warnings.warn(f"fastddpm.patch: patched nothing: {why}", UserWarning, stacklevel=2)
    elif skipped:
        why = "; ".join(f"{n} x {w}" for w, n in skipped.items())
        warnings.warn(f"fastddpm.patch: patched {count} blocks, left unpatched: {why}", UserWarning, stacklevel=2)
    return (model, count) if return_count else model


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a diffusers model), got {type(model).__name__}")


def patched_blocks(model) -> dict[str, int]:
    """How many blocks of ``model`` run fastddpm's fused ops through :func:`patch`:
    {"resnet": ResnetBlock2D count, "attention": Attention count, "norm_out": 0 or 1}."""
    _check_module(model)
    out = {"resnet": 0, "attention": 0, "norm_out": 0}
    for m in model.modules():
        if isinstance(getattr(m, "processor", None), FastddpmAttnProcessor):
            out["attention"] += 1
        orig = getattr(type(m), "_fastddpm_original_class", None)
        if orig is nn.GroupNorm:
            out["norm_out"] += 1
        elif orig is not None and orig is not nn.SiLU:
            out["resnet"] += 1
    return out


def unpatch(model):
    """Undo :func:`patch` in place; returns the model."""
    from diffusers.models.attention_processor import Attention

    _check_module(model)
    for m in model.modules():
        orig = getattr(type(m), "_fastddpm_original_class", None)
        if orig is not None:
            m.__class__ = orig
        if isinstance(m, Attention) and isinstance(m.processor, FastddpmAttnProcessor):
            m.set_processor(m.processor.original)
    return model


def is_patched(model) -> bool:
    """Whether any module of ``model`` runs fastddpm's ops through :func:`patch`."""
    _check_module(model)
    for m in model.modules():
        if getattr(type(m), "_fastddpm_original_class", None) is not None:
            return True
        if isinstance(getattr(m, "processor", None), FastddpmAttnProcessor):
            return True
    return False
