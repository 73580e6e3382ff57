"""Weights in the original DDPM layout (Ho et al.'s diffusion_tf as ported to PyTorch by
pesser/pytorch_diffusion and ermongroup/ddim) to and from :class:`fastddpm.UNet`'s keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the U-Net imports this module: no import back at run time
    from ..models.unet import UNetConfig

__all__ = ["state_dict_from_ddpm", "state_dict_to_ddpm"]


# The original's keys: temb.dense.*, down.i.block.j.*, down.i.attn.j.{norm,q,k,v,proj_out}, mid.block_1,
# up.i.* indexed by level, norm_out, conv_out.
_DDPM_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
                ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut"))


def _ddpm_prefix_map(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(kind, original prefix, fastddpm prefix) for every submodule with weights."""
    if cfg.channel_mult[0] != 1:
        # The original's conv_in and time embedding are base_channels wide, the first level
        # base_channels * channel_mult[0]; here (as in diffusers) all three are the first level's width.
        raise ValueError(f"channel_mult: the original DDPM layout needs channel_mult[0] == 1, "
                         f"got {cfg.channel_mult}")
    L, n = cfg.num_levels, cfg.layers_per_block
    attn = cfg.attention_levels
    out = [("plain", "temb.dense.0", "time_embedding.linear_1"),
           ("plain", "temb.dense.1", "time_embedding.linear_2"),
           ("plain", "conv_in", "conv_in"), ("plain", "norm_out", "conv_norm_out"),
           ("plain", "conv_out", "conv_out")]
    for i in range(L):
        for j in range(n):
            out.append(("resnet", f"down.{i}.block.{j}", f"down_blocks.{i}.resnets.{j}"))
            if attn[i]:
                out.append(("attn", f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}"))
        if i < L - 1:
            out.append(("plain", f"down.{i}.downsample.conv", f"down_blocks.{i}.downsamplers.0.conv"))
    out.append(("resnet", "mid.block_1", "mid_block.resnets.0"))
    if cfg.mid_attention:
        out.append(("attn", "mid.attn_1", "mid_block.attentions.0"))
    out.append(("resnet", "mid.block_2", "mid_block.resnets.1"))
    for k in range(L):
        i = L - 1 - k  # the original indexes the up path by level
        for j in range(n + 1):
            out.append(("resnet", f"up.{i}.block.{j}", f"up_blocks.{k}.resnets.{j}"))
            if attn[i]:
                out.append(("attn", f"up.{i}.attn.{j}", f"up_blocks.{k}.attentions.{j}"))
        if i > 0:
            out.append(("plain", f"up.{i}.upsample.conv", f"up_blocks.{k}.upsamplers.0.conv"))
    return out


def state_dict_from_ddpm(sd: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """An original-DDPM-layout state_dict (pytorch_diffusion / ddim naming) under fastddpm.UNet's keys.

    Raises KeyError naming the keys that are missing or left over, so a mismatched config shows."""
    src = dict(sd)
    out = {}

    def take(key):
        if key not in src:
            raise KeyError(f"sd: missing original DDPM key {key!r}")
        return src.pop(key)

    for kind, a, b in _ddpm_prefix_map(config):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{b}.{p}"] = take(f"{a}.{p}")
        elif kind == "resnet":
            for sa, sb in _DDPM_RESNET:
                if sa == "nin_shortcut" and f"{a}.nin_shortcut.weight" not in src:
                    continue
                for p in ("weight", "bias"):
                    out[f"{b}.{sb}.{p}"] = take(f"{a}.{sa}.{p}")
        else:
            out[f"{b}.norm.weight"] = take(f"{a}.norm.weight")
            out[f"{b}.norm.bias"] = take(f"{a}.norm.bias")
            ws = [take(f"{a}.{n}.weight") for n in "qkv"]
            out[f"{b}.qkv.weight"] = torch.cat([w.reshape(w.shape[0], w.shape[1]) for w in ws])
            out[f"{b}.qkv.bias"] = torch.cat([take(f"{a}.{n}.bias") for n in "qkv"])
            w = take(f"{a}.proj_out.weight")
            out[f"{b}.proj_out.weight"] = w.reshape(w.shape[0], w.shape[1])
            out[f"{b}.proj_out.bias"] = take(f"{a}.proj_out.bias")
    if src:
        raise KeyError(f"sd: keys not in the DDPM layout of this config: {sorted(src)[:8]}")
    return out


def state_dict_to_ddpm(sd: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A fastddpm.UNet state_dict in the original DDPM layout (attention projections as 1x1 convs)."""
    src = dict(sd)
    out = {}
    for kind, a, b in _ddpm_prefix_map(config):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{a}.{p}"] = src.pop(f"{b}.{p}")
        elif kind == "resnet":
            for sa, sb in _DDPM_RESNET:
                if f"{b}.{sb}.weight" in src:
                    for p in ("weight", "bias"):
                        out[f"{a}.{sa}.{p}"] = src.pop(f"{b}.{sb}.{p}")
        else:
            out[f"{a}.norm.weight"] = src.pop(f"{b}.norm.weight")
            out[f"{a}.norm.bias"] = src.pop(f"{b}.norm.bias")
            w, bias = src.pop(f"{b}.qkv.weight"), src.pop(f"{b}.qkv.bias")
            C = w.shape[1]
            for i, n in enumerate("qkv"):
                out[f"{a}.{n}.weight"] = w[i * C:(i + 1) * C, :, None, None]
                out[f"{a}.{n}.bias"] = bias[i * C:(i + 1) * C]
            out[f"{a}.proj_out.weight"] = src.pop(f"{b}.proj_out.weight")[:, :, None, None]
            out[f"{a}.proj_out.bias"] = src.pop(f"{b}.proj_out.bias")
    if src:
        raise KeyError(f"sd: fastddpm keys with no place in the DDPM layout: {sorted(src)[:8]}")
    return out
